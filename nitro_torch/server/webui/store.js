// Conversations and settings, kept in the browser's localStorage (nothing is stored on the server).

const STATE_KEY = "nitro-chat.state.v1";
const API_KEY_KEY = "nitro-chat.api-key";

export const DEFAULT_SETTINGS = Object.freeze({ model: "", temperature: 0.7, maxTokens: 512 });

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export function newConversation(defaults = DEFAULT_SETTINGS) {
  return {
    id: newId(),
    title: "New chat",
    systemPrompt: "",
    model: defaults.model,
    temperature: defaults.temperature,
    maxTokens: defaults.maxTokens,
    messages: [],
    updatedAt: Date.now(),
  };
}

function readJson(key) {
  try {
    return JSON.parse(localStorage.getItem(key));
  } catch {
    return null;
  }
}

/** The saved state, or a fresh one with a single empty conversation. */
export function loadState() {
  const saved = readJson(STATE_KEY);
  if (saved && Array.isArray(saved.conversations) && saved.conversations.length) {
    for (const conversation of saved.conversations) {
      conversation.messages = (conversation.messages || []).map((m) => (
        m.streaming ? { ...m, streaming: false, stopped: true } : m)); // a reload mid-answer
    }
    if (!saved.conversations.some((c) => c.id === saved.currentId)) saved.currentId = saved.conversations[0].id;
    return saved;
  }
  const first = newConversation();
  return { conversations: [first], currentId: first.id };
}

export function saveState(state) {
  try {
    localStorage.setItem(STATE_KEY, JSON.stringify(state));
  } catch (error) {
    console.warn("could not save the conversations", error); // quota: keep working in memory
  }
}

export function getApiKey() {
  return localStorage.getItem(API_KEY_KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(API_KEY_KEY, key);
  else localStorage.removeItem(API_KEY_KEY);
}

/** A title from the first user message. */
export function titleFrom(text) {
  const line = text.trim().split("\n")[0].replace(/\s+/g, " ");
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}
