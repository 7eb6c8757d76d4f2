// The browser chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
// It keeps the conversation here and sends all of it each turn (as every OpenAI client does);
// the server recognizes the shared prefix and computes only the new tokens.
"use strict";

const KEY_STORAGE = "mlx-mixtral-api-key";
const $ = (id) => document.getElementById(id);
const state = { history: [], model: null, controller: null };

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

async function api(path, options = {}, retried = false) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && !retried) {
    const key = window.prompt("This server needs an API key:");
    if (key) {
      sessionStorage.setItem(KEY_STORAGE, key.trim());
      return api(path, options, true);
    }
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;  // text only: model output is never parsed as HTML
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// Server-sent events: events end with a blank line; each "data:" line carries one JSON chunk.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function showUsage(usage, seconds) {
  if (!usage) return;
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  const rate = seconds > 0 ? ` in ${seconds.toFixed(1)} s` : "";
  $("status").textContent = `${usage.prompt_tokens} prompt tokens (${cached} from cache), ` +
    `${usage.completion_tokens} generated${rate}`;
}

async function send(text) {
  // This turn's conversation: "New chat" during the answer replaces state.history, and the answer
  // must not land in the new one.
  const history = state.history;
  history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant streaming", "");
  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  if (state.model) body.model = state.model;
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let answered = "";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) showUsage(chunk.usage, (performance.now() - started) / 1000);
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        answered += delta.content;
        answer.textContent = answered;
        answer.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      bubble("error", String(e.message || e));
      if (!answered) {  // the turn did not happen: keep the roles alternating
        history.pop();
        answer.remove();
      }
    }
  } finally {
    answer.classList.remove("streaming");
    if (answered) history.push({ role: "assistant", content: answered });
    state.controller = null;
    setBusy(false);
    // The buttons and the status line change height at the end: keep the answer's end in view.
    if (answer.isConnected) answer.scrollIntoView({ block: "end" });
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
  $("input").focus();
}

async function loadModel() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const list = await response.json();
    state.model = list.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("status").textContent = `cannot reach the server: ${e.message || e}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setBusy(false);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModel();
  $("input").focus();
});
