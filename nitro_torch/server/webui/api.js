// The OpenAI-compatible API of this server: model list and streamed chat completions.
// Streaming uses fetch + a ReadableStream reader (EventSource cannot POST nor send headers);
// aborting the fetch closes the connection, which makes the server abort the request.

import { getApiKey } from "./store.js";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }

  get unauthorized() {
    return this.status === 401;
  }
}

function headers(extra = {}) {
  const key = getApiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** An ApiError from a non-2xx response, using the OpenAI error body when there is one. */
async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code ?? null;
    } else if (body && body.detail) {
      message = String(body.detail);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

/** The ids of the served models. */
export async function fetchModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw await errorFrom(response);
  const body = await response.json();
  return (body.data || []).map((model) => model.id);
}

/** Yields the JSON payload of each `data:` event of an SSE body until `[DONE]`. */
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Streams a chat completion. `onDelta(text)` gets each piece of content, `onUsage(usage)` the final usage;
 * returns the finish reason. Throws ApiError for server errors and the fetch's AbortError when `signal` aborts.
 */
export async function streamChat(request, { signal, onDelta, onUsage }) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  let finishReason = null;
  for await (const chunk of sseEvents(response.body)) {
    if (chunk.error) throw new ApiError(500, chunk.error.message || "stream error", chunk.error.code);
    if (chunk.usage) onUsage(chunk.usage);
    for (const choice of chunk.choices || []) {
      const content = choice.delta && choice.delta.content;
      if (content) onDelta(content);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
  return finishReason;
}
