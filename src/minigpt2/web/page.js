// The page: the web chat of `minigpt2 serve` (serve/static/chat.html), with the model in a Web
// Worker instead of behind an HTTP endpoint. It keeps the conversation and sends it whole with
// each question, as the served page does; the worker remembers nothing between answers.
"use strict";
const $ = (id) => document.getElementById(id);
const DATA = JSON.parse($("model-data").textContent);
const messages = [];  // the conversation: {role: "user" | "bot", text}
let current = null;   // the answer being streamed: {id, div, reply}
let lastId = 0;       // ids of the answers asked for, so late messages of an old one are ignored
let worker = null;

function showError(text) { $("error").textContent = text || ""; }

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + (role === "user" ? "user" : "assistant");
  div.textContent = text;
  $("transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  const ready = document.body.dataset.ready === "yes";
  $("send").disabled = busy || !ready;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !ready || !messages.some((m) => m.role === "user");
  document.body.dataset.busy = busy ? "yes" : "no";
}

// The sampling options of the controls; a seed makes the answer repeatable, none draws a fresh one.
function settings() {
  const seedText = $("seed").value.trim();
  return {
    sample: {
      ...DATA.sample, temperature: Number($("temperature").value), top_k: Number($("top-k").value),
      max_new_tokens: Math.max(1, Number($("max-tokens").value)),
    },
    seed: seedText === "" ? Math.floor(Math.random() * 2 ** 32) : Number(seedText),
  };
}

function ask() {
  const div = bubble("bot", "");
  div.dataset.state = "streaming";
  div.dataset.chunks = "0";
  current = { id: ++lastId, div, reply: "", started: performance.now() };
  document.body.dataset.worker = "busy";
  showError("");
  setBusy(true);
  const { sample, seed } = settings();
  worker.postMessage({ type: "answer", id: current.id, history: messages.slice(), sample, seed });
}

// The answer is over (state: done, stopped or error): what was said enters the conversation,
// except after an error with nothing shown (as the served page, a broken answer stays on screen,
// marked, and is not sent back).
function finish(state, info) {
  const { div, reply, started } = current;
  div.dataset.state = state;
  div.dataset.ms = (performance.now() - started).toFixed(1);  // for benchmarks/web_chat.py
  if (info) {
    div.dataset.promptTokens = info.prompt_tokens;
    div.dataset.completionTokens = info.completion_tokens;
    div.dataset.finishReason = info.finish_reason;
  }
  if (state === "error" && !reply) {
    div.remove();
  } else if (state !== "error") {
    if (!reply && state === "done") {
      div.dataset.state = "empty";
      div.textContent = "(the answer was empty)";
    }
    messages.push({ role: "bot", text: reply });
  }
  current = null;
  setBusy(false);
}

function onWorkerMessage(event) {
  const m = event.data;
  if (m.type === "ready") {
    document.body.dataset.ready = "yes";
    document.body.dataset.worker = "idle";
    $("model").textContent = describe(DATA);
    setBusy(false);
    return;
  }
  if (m.id === lastId && (m.type === "end" || m.type === "error")) document.body.dataset.worker = "idle";
  if (m.type === "error") showError(m.message);
  if (!current || m.id !== current.id) return;  // an answer already stopped, or before a Reset
  if (m.type === "piece") {
    current.reply += m.text;
    current.div.textContent = current.reply;
    current.div.dataset.chunks = String(Number(current.div.dataset.chunks) + 1);
    current.div.scrollIntoView({ block: "end" });
  } else if (m.type === "end") {
    finish("done", m.info);
  } else if (m.type === "error") {
    finish("error", null);
  }
}

// "name · 3.2M parameters · val loss 0.865": what the header says about the model.
function describe(data) {
  const n = data.n_params;
  const size = n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : n >= 1e3 ? (n / 1e3).toFixed(1) + "k" : String(n);
  const loss = data.val_loss === null ? "no val loss" : "val loss " + data.val_loss.toFixed(3);
  return `${data.name} · ${size} parameters · ${loss}`;
}

function send() {
  const text = $("input").value;
  if (!text.trim() || current || document.body.dataset.ready !== "yes") return;
  $("input").value = "";
  messages.push({ role: "user", text });
  bubble("user", text);
  ask();
}

function stop() {
  if (!current) return;
  worker.postMessage({ type: "stop", id: current.id });
  finish("stopped", null);
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("regenerate").addEventListener("click", () => {
  if (current || !messages.some((m) => m.role === "user")) return;
  while (messages.length && messages[messages.length - 1].role === "bot") messages.pop();
  // Every bubble after the last user message goes: the answers kept, and any failed one.
  const users = $("transcript").querySelectorAll(".msg.user");
  const last = users[users.length - 1];
  while (last.nextElementSibling) last.nextElementSibling.remove();
  ask();
});
$("reset").addEventListener("click", () => {
  if (current) {
    worker.postMessage({ type: "stop", id: current.id });
    current = null;
  }
  messages.length = 0;
  $("transcript").replaceChildren();
  showError("");
  setBusy(false);
  $("input").focus();
});
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
});

// The controls start from the chatbot's defaults (CHAT_SAMPLE, as `minigpt2 chat`).
$("temperature").value = DATA.sample.temperature;
$("temperature-value").textContent = Number(DATA.sample.temperature).toFixed(2);
$("top-k").value = DATA.sample.top_k;
$("max-tokens").value = DATA.sample.max_new_tokens;
document.title = DATA.name + " · minigpt2 chat";

// The worker's code is in this page as text: a Blob of it is a script address the browser accepts
// for a worker even when the page itself was opened from a file.
const code = new Blob([$("worker-code").textContent], { type: "text/javascript" });
worker = new Worker(URL.createObjectURL(code));
worker.onmessage = onWorkerMessage;
worker.onerror = (e) => { showError("the model failed: " + e.message); };
const weights = $("weights");
worker.postMessage({ type: "load", data: DATA, weights: weights.textContent });
weights.remove();  // the worker has its own copy: the page's can go
setBusy(false);
