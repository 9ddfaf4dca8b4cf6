// The chat page's screen, shared by the web chat of `minigpt2 serve` (serve/static/chat.html) and
// the exported page (page.html): the conversation, its bubbles, the composer and the controls. How
// an answer is made is each page's own: the served page streams it from the API, the exported one
// from a Web Worker. Such a page calls `wireControls({ask, stop, running, reset})` once.
"use strict";
const $ = (id) => document.getElementById(id);
const messages = [];  // the conversation, as the API wants it: {role: "user" | "assistant", content}

function showError(text) { $("error").textContent = text || ""; }

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// A page that loads its model says so on <body data-ready="no">: nothing can be sent until that
// changes (the exported page sets "yes"; the served page never sets it).
const ready = () => document.body.dataset.ready !== "no";

function setBusy(busy) {
  $("send").disabled = busy || !ready();
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !ready() || !messages.some((m) => m.role === "user");
  document.body.dataset.busy = busy ? "yes" : "no";
}

// The sampling controls. A blank (or negative) seed is null: a fresh draw for each answer; any other
// seed repeats its answer. A blank length is null: the chatbot's default.
function sampling() {
  const seed = $("seed").value.trim(), length = $("max-tokens").value.trim();
  return {
    temperature: Number($("temperature").value), top_k: Number($("top-k").value),
    max_tokens: length === "" ? null : Number(length),
    seed: seed === "" || Number(seed) < 0 ? null : Number(seed),
  };
}

// The controls start from the chatbot's defaults: what `minigpt2 serve` was told (its --seed too,
// so a server started with one answers the page repeatably until the field is cleared), or the
// export's.
function setSampling({ temperature, top_k, max_tokens, seed }) {
  $("temperature").value = temperature;
  $("temperature-value").textContent = Number(temperature).toFixed(2);
  $("top-k").value = top_k;
  $("max-tokens").value = max_tokens;
  $("seed").value = seed ?? "";
}

// One answer on screen: a bubble that grows piece by piece (data-state "streaming"), then ends
// "done" ("empty" if it said nothing), "stopped" or "error". data-chunks and data-ms are read by the
// tests and benchmarks. `text` is what the conversation keeps: a page may tidy it before `end`.
class Answer {
  constructor() {
    this.div = bubble("assistant", "");
    this.div.dataset.state = "streaming";
    this.div.dataset.chunks = "0";
    this.text = "";
    this.started = performance.now();
    showError("");
    setBusy(true);
  }

  add(piece) {
    this.text += piece;
    this.div.textContent = this.text;
    this.div.dataset.chunks = String(Number(this.div.dataset.chunks) + 1);
    this.div.scrollIntoView({ block: "end" });
  }

  // What was said enters the conversation, except after an error: a broken answer stays on screen,
  // marked, and is not sent back; one that failed before any text goes. An answer that ended with
  // nothing to say says so. A `dropped` answer (a Reset came while it ran) leaves no trace, and
  // leaves the buttons to whatever runs now.
  end(state, dropped = false) {
    const div = this.div;
    div.dataset.state = state;
    div.dataset.ms = (performance.now() - this.started).toFixed(1);
    if (dropped) {
      div.remove();
      return;
    }
    if (state === "error" && !this.text) {
      div.remove();
    } else if (state !== "error") {
      if (!this.text && state === "done") {
        div.dataset.state = "empty";
        div.textContent = "(the answer was empty)";
      }
      messages.push({ role: "assistant", content: this.text });
    }
    setBusy(false);
  }
}

// The composer and the buttons. `page.ask()` answers the conversation in a new Answer;
// `page.running()` says whether an answer is on its way; `page.stop()` stops it, to be ended as
// "stopped" and kept as said so far (at once, or when its request notices); `page.reset()` stops it
// to be dropped (end(state, true)), before the conversation is cleared.
function wireControls(page) {
  function send() {
    const text = $("input").value;
    if (!text.trim() || page.running() || !ready()) return;
    $("input").value = "";
    messages.push({ role: "user", content: text });
    bubble("user", text);
    page.ask();
  }
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (page.running()) page.stop(); });
  $("regenerate").addEventListener("click", () => {
    if (page.running() || !messages.some((m) => m.role === "user")) return;
    while (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
    // Every bubble after the last user message goes: the answers kept, and any failed one.
    const users = $("transcript").querySelectorAll(".msg.user");
    const last = users[users.length - 1];
    while (last.nextElementSibling) last.nextElementSibling.remove();
    page.ask();
  });
  $("reset").addEventListener("click", () => {
    page.reset();
    messages.length = 0;
    $("transcript").replaceChildren();
    showError("");
    setBusy(false);
    $("input").focus();
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  });
  setBusy(false);
}
