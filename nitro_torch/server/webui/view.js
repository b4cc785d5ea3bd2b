// Rendering of the conversation list and of the messages. Model text only reaches the DOM through
// renderMarkdown (answers) or textContent (user messages, errors).

import { renderMarkdown } from "./markdown.js";

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function testid(node, id) {
  node.dataset.testid = id;
  return node;
}

/** "42 tokens · 18.3 tok/s · prompt 120", from message.stats. */
export function formatStats(stats) {
  if (!stats) return "";
  const parts = [];
  const approx = stats.approximate ? "~" : "";
  if (stats.completionTokens != null) {
    parts.push(`${approx}${stats.completionTokens} token${stats.completionTokens === 1 ? "" : "s"}`);
  }
  if (stats.tokensPerSecond != null) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (stats.promptTokens != null) parts.push(`prompt ${stats.promptTokens}`);
  return parts.join(" · ");
}

function fillStats(meta, message) {
  const stats = testid(el("span", "stats", formatStats(message.stats)), "message-stats");
  const s = message.stats || {};
  if (s.completionTokens != null) stats.dataset.completionTokens = String(s.completionTokens);
  if (s.promptTokens != null) stats.dataset.promptTokens = String(s.promptTokens);
  if (s.tokensPerSecond != null) stats.dataset.tokensPerSecond = s.tokensPerSecond.toFixed(2);
  meta.appendChild(stats);
}

function metaNode(message) {
  const meta = el("div", "message-meta");
  if (message.stopped) meta.appendChild(testid(el("span", "badge stopped", "Stopped"), "message-stopped"));
  if (message.finishReason === "length") meta.appendChild(el("span", "badge", "Max tokens reached"));
  if (message.stats) fillStats(meta, message);
  if (message.model) meta.appendChild(el("span", "model-name", message.model));
  return meta;
}

/** Fills the body of an assistant message (called again on each streamed piece). */
export function fillAnswer(body, message) {
  body.replaceChildren(renderMarkdown(message.content));
  // The cursor and "Thinking…" are CSS pseudo-elements: they never show up in the message's text.
  body.classList.toggle("thinking", Boolean(message.streaming && !message.content));
}

export function messageNode(message) {
  const node = el("article", `message ${message.role}`);
  const body = testid(el("div", "message-body"), "message-content");
  if (message.role === "user") {
    testid(node, "user-message");
    body.textContent = message.content;
  } else if (message.role === "error") {
    testid(node, "error-message");
    body.textContent = message.content;
  } else {
    testid(node, "assistant-message");
    fillAnswer(body, message);
    if (message.streaming) node.classList.add("streaming");
    if (message.stopped) node.classList.add("stopped");
  }
  node.appendChild(body);
  if (message.role === "assistant" && !message.streaming) node.appendChild(metaNode(message));
  return node;
}

export function emptyState() {
  const node = testid(el("div", "empty-state"), "empty-state");
  node.append(el("h2", null, "How can I help?"), el("p", "muted", "Answers stream from the model served here."));
  return node;
}

/** The sidebar list; `actions` has select(id) and remove(id). */
export function conversationList(conversations, currentId, actions) {
  const sorted = [...conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  return sorted.map((conversation) => {
    const item = testid(el("li", "conversation"), "conversation-item");
    if (conversation.id === currentId) item.classList.add("active");
    item.dataset.id = conversation.id;
    const open = el("button", "conversation-title", conversation.title);
    open.type = "button";
    open.title = conversation.title;
    open.addEventListener("click", () => actions.select(conversation.id));
    const remove = testid(el("button", "icon-button delete", "✕"), "delete-conversation");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    remove.addEventListener("click", () => actions.remove(conversation.id));
    item.append(open, remove);
    return item;
  });
}
