// The chat page: conversations (localStorage), settings, and streamed answers with a Stop button.

import { fetchModels, streamChat } from "./api.js";
import { askForApiKey } from "./keydialog.js";
import { DEFAULT_SETTINGS, getApiKey, loadState, newConversation, saveState, setApiKey, titleFrom } from "./store.js";
import { conversationList, emptyState, fillAnswer, messageNode } from "./view.js";

const $ = (id) => document.getElementById(id);
const state = loadState();
let models = [];
let active = null; // the streaming answer: { controller, conversation, message, body }
let renderQueued = false;

const current = () => state.conversations.find((c) => c.id === state.currentId);
const persist = () => saveState(state);

// ---- notices ------------------------------------------------------------------------------------

function notify(text) {
  const notice = $("notice");
  notice.textContent = text || "";
  notice.hidden = !text;
}

// ---- panels (phone layout) ------------------------------------------------------------------------

function closePanels() {
  document.body.classList.remove("sidebar-open", "settings-open");
}

function togglePanel(name) {
  const cls = `${name}-open`;
  const opening = !document.body.classList.contains(cls);
  closePanels();
  if (opening) document.body.classList.add(cls);
}

// ---- rendering ------------------------------------------------------------------------------------

function renderSidebar() {
  $("conversation-list").replaceChildren(...conversationList(state.conversations, state.currentId, {
    select: selectConversation,
    remove: deleteConversation,
  }));
}

function nearBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function renderMessages() {
  const conversation = current();
  const box = $("messages");
  const nodes = conversation.messages.map((message) => {
    const node = messageNode(message);
    if (active && message === active.message) active.body = node.querySelector(".message-body");
    return node;
  });
  box.replaceChildren(...(nodes.length ? nodes : [emptyState()]));
  box.scrollTop = box.scrollHeight;
  $("chat-title").textContent = conversation.title;
  document.title = `${conversation.title} · nitro_torch`;
}

function renderSettings() {
  const conversation = current();
  $("system-prompt").value = conversation.systemPrompt || "";
  $("temperature").value = String(conversation.temperature ?? DEFAULT_SETTINGS.temperature);
  $("max-tokens").value = String(conversation.maxTokens ?? DEFAULT_SETTINGS.maxTokens);
  renderModels();
  const key = getApiKey();
  $("api-key-status").textContent = key ? `Key set (…${key.slice(-4)})` : "No key set";
  $("api-key-forget").disabled = !key;
}

function renderModels() {
  const select = $("model-select");
  const conversation = current();
  const ids = [...models];
  if (conversation.model && !ids.includes(conversation.model)) ids.push(conversation.model);
  select.replaceChildren(...ids.map((id) => {
    const option = document.createElement("option");
    option.value = id;
    option.textContent = models.includes(id) ? id : `${id} (not served)`;
    return option;
  }));
  select.value = conversation.model && ids.includes(conversation.model) ? conversation.model : (ids[0] || "");
  select.disabled = ids.length === 0;
}

function renderAll() {
  renderSidebar();
  renderMessages();
  renderSettings();
}

/** Re-renders the streaming answer at most once per frame. */
function queueAnswerRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    if (!active || !active.body || !active.body.isConnected) return;
    const box = $("messages");
    const follow = nearBottom(box);
    fillAnswer(active.body, active.message);
    if (follow) box.scrollTop = box.scrollHeight;
  });
}

function setStreaming(streaming) {
  $("send-button").hidden = streaming;
  $("stop-button").hidden = !streaming;
}

// ---- conversations --------------------------------------------------------------------------------

function selectConversation(id) {
  state.currentId = id;
  persist();
  closePanels();
  renderAll();
}

function startConversation() {
  const empty = state.conversations.find((c) => c.messages.length === 0);
  const conversation = empty || newConversation(state.defaults || DEFAULT_SETTINGS);
  if (!empty) state.conversations.push(conversation);
  conversation.updatedAt = Date.now();
  selectConversation(conversation.id);
  $("message-input").focus();
}

function deleteConversation(id) {
  if (active && active.conversation.id === id) active.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (!state.conversations.length) state.conversations.push(newConversation(state.defaults || DEFAULT_SETTINGS));
  if (!state.conversations.some((c) => c.id === state.currentId)) {
    state.currentId = [...state.conversations].sort((a, b) => b.updatedAt - a.updatedAt)[0].id;
  }
  persist();
  renderAll();
}

/** Saves a setting on the current conversation, and as the default of new ones. */
function updateSetting(field, value) {
  const conversation = current();
  conversation[field] = value;
  if (field !== "systemPrompt") state.defaults = { ...(state.defaults || DEFAULT_SETTINGS), [field]: value };
  persist();
}

// ---- the API ----------------------------------------------------------------------------------------

async function loadModels() {
  try {
    models = await fetchModels();
    notify("");
  } catch (error) {
    if (!error.unauthorized) {
      notify(`Could not load the models: ${error.message}`);
      return;
    }
    const accepted = await askForApiKey("This server needs an API key.");
    if (!accepted) {
      notify("This server needs an API key: set one in Settings.");
      return;
    }
    models = accepted;
    notify("");
  }
  renderSettings();
}

function chatRequest(conversation) {
  const messages = [];
  if (conversation.systemPrompt && conversation.systemPrompt.trim()) {
    messages.push({ role: "system", content: conversation.systemPrompt });
  }
  for (const message of conversation.messages) {
    if ((message.role === "user" || message.role === "assistant") && message.content) {
      messages.push({ role: message.role, content: message.content });
    }
  }
  const request = { messages };
  const model = conversation.model || models[0];
  if (model) request.model = model;
  const temperature = Number(conversation.temperature);
  if (Number.isFinite(temperature)) request.temperature = temperature;
  const maxTokens = parseInt(conversation.maxTokens, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  return request;
}

function answerStats(timing, usage, stopped) {
  const end = performance.now();
  const completion = usage ? usage.completion_tokens : timing.pieces;
  const seconds = timing.first === null ? 0 : (end - timing.first) / 1000;
  return {
    completionTokens: completion,
    promptTokens: usage ? usage.prompt_tokens : null,
    tokensPerSecond: seconds > 0 && completion > 0 ? completion / seconds : null,
    seconds,
    approximate: !usage && stopped,
  };
}

/** Streams an answer to `conversation`; on 401 asks for a key and tries again. */
async function generate(conversation) {
  const request = chatRequest(conversation);
  const message = { role: "assistant", content: "", streaming: true, model: request.model };
  conversation.messages.push(message);
  const controller = new AbortController();
  active = { controller, conversation, message, body: null };
  const timing = { first: null, pieces: 0 };
  let usage = null;
  let retry = false;
  setStreaming(true);
  renderMessages();
  try {
    message.finishReason = await streamChat(request, {
      signal: controller.signal,
      onDelta: (text) => {
        if (timing.first === null) timing.first = performance.now();
        timing.pieces += 1;
        message.content += text;
        queueAnswerRender();
      },
      onUsage: (u) => { usage = u; },
    });
    message.stats = answerStats(timing, usage, false);
  } catch (error) {
    if (error.name === "AbortError") {
      message.stopped = true;
      message.stats = answerStats(timing, usage, true);
    } else {
      if (!message.content) conversation.messages.splice(conversation.messages.indexOf(message), 1);
      else message.stopped = true;
      if (error.unauthorized) retry = true;
      else conversation.messages.push({ role: "error", content: error.message || String(error) });
    }
  } finally {
    message.streaming = false;
    active = null;
    setStreaming(false);
    conversation.updatedAt = Date.now();
    persist();
    if (conversation.id === state.currentId) renderMessages();
    renderSidebar();
  }
  if (retry) await retryWithKey(conversation);
}

async function retryWithKey(conversation) {
  const accepted = await askForApiKey("The server refused the request: it needs a valid API key.");
  if (!accepted) {
    conversation.messages.push({ role: "error", content: "The server needs an API key: set one in Settings." });
    persist();
    renderMessages();
    return;
  }
  models = accepted;
  renderSettings();
  await generate(conversation);
}

async function send() {
  const input = $("message-input");
  const text = input.value.trim();
  if (!text || active) return;
  const conversation = current();
  if (!conversation.messages.length || conversation.title === "New chat") conversation.title = titleFrom(text);
  conversation.messages.push({ role: "user", content: text });
  input.value = "";
  autosize(input);
  await generate(conversation);
}

function stop() {
  if (active) active.controller.abort();
}

// ---- wiring -------------------------------------------------------------------------------------------

function autosize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${Math.min(textarea.scrollHeight, 200)}px`;
}

function wireComposer() {
  const input = $("message-input");
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  input.addEventListener("input", () => autosize(input));
  $("stop-button").addEventListener("click", stop);
}

function wireSettings() {
  $("system-prompt").addEventListener("input", (e) => updateSetting("systemPrompt", e.target.value));
  $("model-select").addEventListener("change", (e) => updateSetting("model", e.target.value));
  $("temperature").addEventListener("change", (e) => {
    const value = Math.min(2, Math.max(0, Number(e.target.value)));
    updateSetting("temperature", Number.isFinite(value) ? value : DEFAULT_SETTINGS.temperature);
  });
  $("max-tokens").addEventListener("change", (e) => {
    const value = parseInt(e.target.value, 10);
    updateSetting("maxTokens", value > 0 ? value : DEFAULT_SETTINGS.maxTokens);
  });
  $("api-key-change").addEventListener("click", async () => {
    const accepted = await askForApiKey("Enter the API key of this server.");
    if (accepted) models = accepted;
    renderSettings();
  });
  $("api-key-forget").addEventListener("click", () => {
    setApiKey("");
    renderSettings();
  });
}

function wirePanels() {
  $("menu-button").addEventListener("click", () => togglePanel("sidebar"));
  $("settings-button").addEventListener("click", () => togglePanel("settings"));
  $("backdrop").addEventListener("click", closePanels);
  for (const button of document.querySelectorAll("[data-close]")) button.addEventListener("click", closePanels);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closePanels();
  });
  $("new-chat").addEventListener("click", startConversation);
}

// Another tab changed the conversations: take its state unless this tab is streaming.
window.addEventListener("storage", (event) => {
  if (active || !event.key || !event.key.startsWith("nitro-chat.")) return;
  Object.assign(state, loadState());
  renderAll();
});

wireComposer();
wireSettings();
wirePanels();
renderAll();
loadModels();
document.body.dataset.ready = "true";
