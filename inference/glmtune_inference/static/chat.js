// The chat page: talks to this server's OpenAI-compatible API (GET v1/models, POST v1/chat/completions with
// stream=true) and renders the server-sent events as they arrive. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "glmtune.apiKey";
const state = {
  turns: [],          // finished [user text, assistant text] pairs: the history sent with each request
  controller: null,   // the AbortController of the request being streamed, if any
  config: { api_key_required: false, report: false },
};

function showStatus(text) { $("status").textContent = text || ""; }

function requestHeaders(json) {
  const headers = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

// The message of an error response: the API's {"error": {...}} or FastAPI's {"detail": [...]} (field errors).
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    if (body.detail) return String(body.detail);
  } catch (_) { /* not JSON: fall through to the status line */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

async function loadConfig() {
  const response = await fetch("ui/config");
  if (response.ok) state.config = await response.json();
  $("api-key-row").hidden = !state.config.api_key_required;
  $("report-link").hidden = !state.config.report;
  if (state.config.max_tokens_limit) $("max-tokens").max = state.config.max_tokens_limit;
  if (state.config.default_max_tokens) $("max-tokens").value = state.config.default_max_tokens;
}

async function loadModels() {
  const select = $("model");
  const previous = select.value;
  const response = await fetch("v1/models", { headers: requestHeaders(false) });
  if (response.status === 401) {
    $("api-key-row").hidden = false;
    showStatus($("api-key").value.trim() ? "The server refused the API key: " + await errorMessage(response)
                                         : "This server needs an API key: enter it in the settings.");
    select.replaceChildren();
    return;
  }
  if (!response.ok) { showStatus("Listing models failed: " + await errorMessage(response)); return; }
  const models = (await response.json()).data.map((m) => m.id);
  select.replaceChildren(...models.map((id) => new Option(id, id)));
  if (models.includes(previous)) select.value = previous;
  showStatus(models.length ? "" : "This server serves no model.");
}

function addMessage(role, text, label) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const head = document.createElement("div");
  head.className = "role";
  head.textContent = label;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(head, content);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, content };
}

// Yields the data of each server-sent event of a fetch body (events end with a blank line).
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function requestMessages(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const [user, assistant] of state.turns) {
    messages.push({ role: "user", content: user }, { role: "assistant", content: assistant });
  }
  messages.push({ role: "user", content: text });
  return messages;
}

function generationSettings() {
  const maxTokens = $("max-tokens");
  if (!maxTokens.checkValidity()) throw new Error(`Max tokens: ${maxTokens.validationMessage}`);
  return {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number(maxTokens.value),
  };
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("new-chat").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("prompt").value.trim();
  const model = $("model").value;
  if (!text || state.controller) return;
  if (!model) { showStatus("No model to ask: check the API key."); return; }
  let settings;
  try { settings = generationSettings(); } catch (err) { showStatus(err.message); return; }
  const body = { model, messages: requestMessages(text), stream: true, ...settings };
  $("prompt").value = "";
  addMessage("user", text, "You");
  const reply = addMessage("assistant", "", model);
  reply.item.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  showStatus("");
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: requestHeaders(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        reply.content.textContent = answer;
        reply.item.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    reply.item.dataset.finish = finish || "";
    state.turns.push([text, answer]);
    if (finish === "length") showStatus("The answer reached max tokens.");
  } catch (err) {
    if (err.name === "AbortError") {
      // Closing the stream is what stops the server: it cancels a generation whose client went away.
      reply.item.classList.add("stopped");
      reply.item.dataset.finish = "stopped";
      if (answer) state.turns.push([text, answer]);
      showStatus("Stopped.");
    } else {
      reply.item.classList.add("error");
      reply.item.dataset.finish = "error";
      const note = document.createElement("div");
      note.className = "error-text";
      note.textContent = err.message;
      reply.item.append(note);
      showStatus(err.message);
    }
  } finally {
    reply.item.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

async function openReport(event) {
  // A plain link cannot carry the API key: fetch the report with it and show it from a blob.
  if (!state.config.api_key_required) return;
  event.preventDefault();
  const response = await fetch("report", { headers: requestHeaders(false) });
  if (!response.ok) { showStatus("Training report: " + await errorMessage(response)); return; }
  window.open(URL.createObjectURL(await response.blob()), "_blank");
}

function newChat() {
  state.turns = [];
  $("messages").replaceChildren();
  showStatus("");
  $("prompt").focus();
}

function bindRange(id) {
  const show = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

async function start() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("report-link").addEventListener("click", openReport);
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  bindRange("temperature");
  bindRange("top-p");
  try {
    await loadConfig();
    await loadModels();
  } catch (err) {
    showStatus("Cannot reach the server: " + err.message);
  }
  document.body.dataset.ready = "true";
}

start();
