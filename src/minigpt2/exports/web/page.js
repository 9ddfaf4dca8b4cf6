// How the exported page gets its answers: from the model in a Web Worker, where the served page
// (serve/static/chat.html) streams them from an HTTP endpoint. The screen is chat_ui.js, the same
// in both. The page sends the conversation whole with each question; the worker remembers nothing
// between answers.
"use strict";
const DATA = JSON.parse($("model-data").textContent);
let current = null;   // the answer being made: {id, answer}
let lastId = 0;       // ids of the answers asked for, so late messages of an old one are ignored
let worker = null;

function ask() {
  current = { id: ++lastId, answer: new Answer() };
  document.body.dataset.worker = "busy";
  const { seed, temperature, top_k, max_tokens } = sampling();
  const length = Math.max(1, max_tokens ?? DATA.sample.max_new_tokens);  // blank: the default
  // The worker's chatbot (chat.js) speaks of turns as core/chat.py does: {role: "user" | "bot", text}.
  const history = messages.map((m) => ({ role: m.role === "user" ? "user" : "bot", text: m.content }));
  worker.postMessage({
    type: "answer", id: current.id, history,
    sample: { ...DATA.sample, temperature, top_k, max_new_tokens: length },
    seed: seed === null ? Math.floor(Math.random() * 2 ** 32) : seed,  // none given: a fresh draw
  });
}

// The answer is over (done, stopped or error), with the worker's counts when it ended by itself.
function finish(state, info, dropped = false) {
  const { answer } = current;
  if (info) {
    answer.div.dataset.promptTokens = info.prompt_tokens;
    answer.div.dataset.completionTokens = info.completion_tokens;
    answer.div.dataset.finishReason = info.finish_reason;
  }
  current = null;
  answer.end(state, dropped);
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
    current.answer.add(m.text);
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

function stopWorker() {
  worker.postMessage({ type: "stop", id: current.id });
}

$("model").textContent = "loading the model…";
setSampling({ ...DATA.sample, max_tokens: DATA.sample.max_new_tokens });  // CHAT_SAMPLE, as `minigpt2 chat`
document.title = DATA.name + " · minigpt2 chat";
wireControls({
  ask,
  running: () => current !== null,
  stop: () => { stopWorker(); finish("stopped", null); },
  reset: () => { if (current) { stopWorker(); finish("stopped", null, true); } },
});

// The worker's code is in this page as text: a Blob of it is a script address the browser accepts
// for a worker even when the page itself was opened from a file.
const code = new Blob([$("worker-code").textContent], { type: "text/javascript" });
worker = new Worker(URL.createObjectURL(code));
worker.onmessage = onWorkerMessage;
worker.onerror = (e) => { showError("the model failed: " + e.message); };
const weights = $("weights");
worker.postMessage({ type: "load", data: DATA, weights: weights.textContent });
weights.remove();  // the worker has its own copy: the page's can go
