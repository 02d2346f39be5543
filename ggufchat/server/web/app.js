// The ggufchat web chat: one page over the server's own OpenAI API. Replies stream in through
// fetch + ReadableStream (server-sent events of /v1/chat/completions); Stop aborts the fetch, which
// closes the connection, and the server cancels the sequence when its client goes away.
// URLs are relative (the page is at / or /ui), so it also works behind a proxy that mounts the
// server under a sub-path.

import { renderMarkdown } from "./markdown.js";

const KEY_STORE = "ggufchat.apiKey";
const SETTINGS_STORE = "ggufchat.settings";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), scroller: $("scroller"), input: $("input"), composer: $("composer"),
  send: $("send"), stop: $("stop"), newChat: $("new-chat"), newChatTop: $("new-chat-top"), system: $("system-prompt"),
  maxTokens: $("max-tokens"), maxTokensValue: $("max-tokens-value"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), modelName: $("model-name"), statusDot: $("status-dot"), title: $("title"),
  keyButton: $("key-button"), keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"),
  keyReason: $("key-reason"), keyCancel: $("key-cancel"), menu: $("menu"), sidebar: $("sidebar"), scrim: $("scrim"),
  modelField: $("model-field"), modelPicker: $("model-picker"),
};
const MODEL_STORE = "ggufchat.model";

const state = {
  messages: [], // the conversation: {role: "user" | "assistant", content} (answers without their thinking)
  model: null,
  models: [], // the server's model cards (several: the picker offers them)
  key: localStorage.getItem(KEY_STORE) || "",
  controller: null, // the running generation's AbortController
};

class ServerError extends Error {}

// ------------------------------------------------------------------ API
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON: fall through
  }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

// fetch with the API key; on 401 ask for a (new) key and try again, until the user gives up.
async function apiFetch(path, init = {}) {
  for (;;) {
    const headers = { ...(init.headers || {}) };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    const message = await errorMessage(response);
    const reason = state.key ? `The server refused this key: ${message}` : "This server needs an API key.";
    const key = await askKey(reason);
    if (key === null) throw new ServerError(message);
    setKey(key);
  }
}

// The data of each server-sent event, decoded as UTF-8 across chunk boundaries (a character's bytes
// may arrive in two reads).
async function* serverSentEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
    if (done) return;
  }
}

// ------------------------------------------------------------------ the conversation on screen
function scrollToEnd(force) {
  const s = ui.scroller;
  if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 80) s.scrollTop = s.scrollHeight;
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const row = document.createElement("div");
  row.className = `msg ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  row.append(bubble);
  if (role === "user") bubble.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  row.append(meta);
  ui.messages.append(row);
  scrollToEnd(true);
  return { row, bubble, meta };
}

function addError(message) {
  const row = document.createElement("div");
  row.className = "msg error";
  row.setAttribute("role", "alert");
  row.textContent = message;
  ui.messages.append(row);
  scrollToEnd(true);
  return row;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API outside secure contexts (plain http on a LAN address): the old way.
    const area = document.createElement("textarea");
    area.value = text;
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

function copyButton(label, getText) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = label;
  button.addEventListener("click", async () => {
    const ok = await copyText(getText());
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = label; }, 1500);
  });
  return button;
}

// An assistant reply being streamed: re-rendered at most once per frame. A reasoning model's thinking
// (the deltas' reasoning_content) goes into a collapsed <details> above the answer, as plain text.
class ReplyView {
  constructor() {
    Object.assign(this, addMessage("assistant", ""));
    this.text = "";
    this.thinking = "";
    this.details = null; // the thinking block, made when the first thinking arrives
    this.pending = false;
    this.bubble.classList.add("streaming");
  }

  append(delta) {
    this.text += delta;
    this.schedule();
  }

  appendThinking(delta) {
    if (!this.details) this.makeDetails();
    this.thinking += delta;
    this.schedule();
  }

  makeDetails() {
    this.details = document.createElement("details");
    this.details.className = "thinking streaming";
    this.summary = document.createElement("summary");
    this.summary.textContent = "Thinking…";
    this.thinkingBody = document.createElement("div");
    this.thinkingBody.className = "thinking-text";
    this.details.append(this.summary, this.thinkingBody);
    this.row.insertBefore(this.details, this.bubble);
  }

  schedule() {
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.render());
    }
  }

  render() {
    this.pending = false;
    // Model output: text, never HTML. Blank space around it (the model's "<think>\n") is left out.
    if (this.details) this.thinkingBody.textContent = this.thinking.trim();
    if (this.details && this.text) this.thoughtDone();
    this.bubble.innerHTML = renderMarkdown(this.text); // safe: renderMarkdown escapes the text first
    scrollToEnd(false);
  }

  thoughtDone() {
    this.details.classList.remove("streaming");
    this.summary.textContent = "Thought";
  }

  finish({ stopped, finishReason, usage, seconds }) {
    this.render();
    if (this.details) this.thoughtDone();
    this.bubble.classList.remove("streaming");
    this.bubble.hidden = !this.text; // only thinking came (cut at max tokens, or stopped)
    for (const pre of this.bubble.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      pre.append(copyButton("Copy", () => code.textContent));
    }
    const notes = [];
    if (usage && usage.completion_tokens) {
      notes.push(`${usage.completion_tokens} tokens`);
      if (seconds > 0) notes.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    }
    if (stopped) notes.push("stopped");
    else if (finishReason === "length") notes.push("cut at max tokens");
    if (this.text) this.meta.append(copyButton("Copy", () => this.text));
    const info = document.createElement("span");
    info.className = "info";
    info.textContent = notes.join(" · ");
    this.meta.append(info);
  }
}

// ------------------------------------------------------------------ sending
function settings() {
  return {
    system: ui.system.value.trim(),
    maxTokens: Math.max(1, parseInt(ui.maxTokens.value, 10) || 512),
    temperature: Math.min(2, Math.max(0, parseFloat(ui.temperature.value) || 0)),
  };
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  document.body.classList.toggle("busy", busy);
  updateSend();
}

function updateSend() {
  ui.send.disabled = !ui.input.value.trim() || state.controller !== null;
}

async function send(text) {
  const userView = addMessage("user", text);
  const chat = state.messages; // New chat replaces the array: a late finish then writes to the old one
  chat.push({ role: "user", content: text });
  const { system, maxTokens, temperature } = settings();
  const messages = system ? [{ role: "system", content: system }, ...chat] : [...chat];
  const body = JSON.stringify({
    model: state.model || "default", messages, stream: true, stream_options: { include_usage: true },
    max_tokens: maxTokens, temperature,
  });
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const view = new ReplyView();
  const t0 = performance.now();
  let tFirst = null;
  let finishReason = null;
  let usage = null;
  let error = null;
  try {
    const response = await apiFetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body, signal: controller.signal,
    });
    if (!response.ok) throw new ServerError(await errorMessage(response));
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new ServerError(event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        if (tFirst === null) tFirst = performance.now();
        view.appendThinking(delta.reasoning_content);
      }
      if (delta.content) {
        if (tFirst === null) tFirst = performance.now();
        view.append(delta.content);
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  } catch (exc) {
    if (!controller.signal.aborted) {
      error = exc instanceof ServerError ? exc.message
        : exc instanceof TypeError ? `Could not reach the server (${exc.message}).` : String(exc.message || exc);
    }
  } finally {
    const stopped = controller.signal.aborted;
    state.controller = null;
    if (state.models.length > 1) refreshModels(); // the model just used is loaded now, another may not be
    if (view.text || view.thinking) {
      // The answer alone goes back in the history: reasoning models' templates expect no thinking there.
      chat.push({ role: "assistant", content: view.text });
      const seconds = tFirst === null ? 0 : (performance.now() - tFirst) / 1000;
      view.finish({ stopped, finishReason, usage, seconds: seconds || (performance.now() - t0) / 1000 });
    } else {
      // Nothing came back: the turn never happened. Take it out of the history and give the text back.
      view.row.remove();
      userView.row.remove();
      chat.pop();
      if (!ui.input.value && chat === state.messages) ui.input.value = text;
      ui.empty.hidden = ui.messages.querySelector(".msg") !== null;
    }
    if (error && chat === state.messages) addError(error);
    setBusy(false);
    autosize();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.messages = [];
  for (const row of ui.messages.querySelectorAll(".msg")) row.remove();
  ui.empty.hidden = false;
  closeSidebar();
  ui.input.focus();
}

// ------------------------------------------------------------------ API key
function setKey(key) {
  state.key = key;
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

let keyWaiters = [];

// Resolves to the key typed in, or null when the user cancels. Concurrent callers share one dialog.
function askKey(reason) {
  ui.keyReason.textContent = reason;
  ui.keyInput.value = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function closeKeyDialog(value) {
  if (ui.keyDialog.open) ui.keyDialog.close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve(value);
}

// ------------------------------------------------------------------ server status
async function connect() {
  try {
    const response = await fetch("health"); // public: no key needed
    const health = await response.json().catch(() => ({}));
    state.model = health.model || null;
    setStatus(response.ok ? health.status : "down", health.model || "unknown model");
    if (response.status === 503) {
      setTimeout(connect, 1000); // still loading
      return;
    }
  } catch {
    setStatus("down", "server unreachable");
    setTimeout(connect, 3000);
    return;
  }
  try {
    const response = await apiFetch("v1/models"); // asks for the key now, if the server has one
    if (!response.ok) return;
    state.models = (await response.json()).data || [];
    showModels();
  } catch (exc) {
    addError(exc.message);
  }
}

async function refreshModels() {
  try {
    const response = await apiFetch("v1/models");
    if (response.ok) {
      state.models = (await response.json()).data || [];
      showModels();
    }
  } catch {
    // the next reply tries again
  }
}

// A server with several models: a picker, its choice kept in this browser. With one model there is
// nothing to pick (that server answers every request with it, whatever the name).
function showModels() {
  const ids = state.models.map((card) => card.id);
  if (ids.length > 1) {
    const saved = localStorage.getItem(MODEL_STORE);
    if (saved && ids.includes(saved)) state.model = saved;
    ui.modelPicker.replaceChildren(...state.models.map((card) => {
      const option = document.createElement("option");
      option.value = card.id;
      option.textContent = card.status === "ready" ? card.id : `${card.id} (not loaded)`;
      return option;
    }));
    ui.modelPicker.value = state.model && ids.includes(state.model) ? state.model : ids[0];
    state.model = ui.modelPicker.value;
    ui.modelField.hidden = false;
  }
  const card = state.models.find((c) => c.id === state.model) || state.models[0];
  if (card && card.n_ctx_per_sequence) setMaxTokensLimit(card.n_ctx_per_sequence);
  ui.modelName.textContent = state.model || ui.modelName.textContent;
  ui.title.textContent = state.model || "ggufchat";
}

function pickModel() {
  state.model = ui.modelPicker.value;
  localStorage.setItem(MODEL_STORE, state.model);
  showModels();
}

function setStatus(status, model) {
  ui.statusDot.className = `dot ${status}`;
  ui.statusDot.title = status;
  ui.modelName.textContent = model;
  ui.modelName.title = `${model} (${status})`;
  ui.title.textContent = state.model || "ggufchat";
}

function setMaxTokensLimit(limit) {
  for (const el of [ui.maxTokens, ui.maxTokensValue]) el.max = String(limit);
  if (parseInt(ui.maxTokens.value, 10) > limit) syncPair(ui.maxTokens, ui.maxTokensValue, limit);
}

// ------------------------------------------------------------------ settings (kept in localStorage)
function syncPair(range, number, value) {
  range.value = String(value);
  number.value = range.value; // the range clamps and rounds to its step
  saveSettings();
}

function saveSettings() {
  const { maxTokens, temperature } = settings();
  localStorage.setItem(SETTINGS_STORE, JSON.stringify({ system: ui.system.value, maxTokens, temperature }));
}

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}") || {};
  } catch {
    saved = {};
  }
  if (typeof saved.system === "string") ui.system.value = saved.system;
  if (saved.maxTokens) ui.maxTokens.value = ui.maxTokensValue.value = String(saved.maxTokens);
  if (saved.temperature !== undefined) ui.temperature.value = ui.temperatureValue.value = String(saved.temperature);
}

function pair(range, number) {
  range.addEventListener("input", () => { number.value = range.value; saveSettings(); });
  number.addEventListener("change", () => {
    const v = parseFloat(number.value);
    syncPair(range, number, Number.isFinite(v) ? v : range.value);
  });
}

// ------------------------------------------------------------------ layout
function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function openSidebar() {
  document.body.classList.add("sidebar-open");
  ui.scrim.hidden = false;
  ui.menu.setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  ui.menu.setAttribute("aria-expanded", "false");
}

// ------------------------------------------------------------------ wiring
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text || state.controller) return;
  ui.input.value = "";
  autosize();
  send(text);
});
ui.input.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (Chinese input) does not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.input.addEventListener("input", () => { autosize(); updateSend(); });
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.newChatTop.addEventListener("click", newChat);
ui.system.addEventListener("input", saveSettings);
ui.modelPicker.addEventListener("change", pickModel);
pair(ui.maxTokens, ui.maxTokensValue);
pair(ui.temperature, ui.temperatureValue);
ui.menu.addEventListener("click", () => (document.body.classList.contains("sidebar-open") ? closeSidebar() : openSidebar()));
ui.scrim.addEventListener("click", closeSidebar);

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  closeKeyDialog(ui.keyInput.value.trim());
});
ui.keyCancel.addEventListener("click", () => closeKeyDialog(null));
ui.keyDialog.addEventListener("cancel", (event) => { // Escape
  event.preventDefault();
  closeKeyDialog(null);
});
ui.keyButton.addEventListener("click", async () => {
  const key = await askKey("Enter the server's API key (leave empty to forget the stored one).");
  if (key !== null) {
    setKey(key);
    connect();
  }
});

loadSettings();
autosize();
connect();

// For tests and the browser console: the conversation as sent to the server, and the renderer.
window.ggufchat = { state, renderMarkdown, serverSentEvents };
