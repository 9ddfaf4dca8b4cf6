// The Web Worker the page runs the model in, so that the page stays responsive while it computes.
// It is built from model.js, tokenizer.js, generate.js, chat.js and this file, joined into one
// Blob (the page is one file; a worker cannot be loaded from a file:// address).
//
// Messages from the page:
//   {type: "load", data, weights}       data: the page's model description; weights: base64
//   {type: "answer", id, history, sample, seed}
//   {type: "stop", id}
// Messages to the page:
//   {type: "ready"}                     the model is built
//   {type: "piece", id, text}           the next piece of answer `id`
//   {type: "end", id, info}             answer `id` is over: prompt_tokens, completion_tokens,
//                                       finish_reason ("stop", "length" or "stopped")
//   {type: "error", id, message}
"use strict";

let chatbot = null;
const running = new Map();  // answer id -> its AbortController

// Base64 -> bytes (Uint8Array.fromBase64 where the browser has it: several times faster).
function fromBase64(text) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// IEEE half precision (1 sign, 5 exponent, 10 fraction bits) -> a number.
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;  // zero and subnormals
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

// The tensors by name, as Float32Arrays: views of the bytes for fp32 (little-endian, 4-aligned
// offsets), converted through a 65,536-entry table for fp16.
function readTensors(manifest, bytes, dtype) {
  const tensors = {};
  const table = dtype === "fp16" ? Float32Array.from({ length: 65536 }, (_, h) => halfToFloat(h)) : null;
  for (const { name, shape, offset } of manifest) {
    const size = shape.reduce((a, b) => a * b, 1);
    if (table) {
      const halves = new Uint16Array(bytes.buffer, bytes.byteOffset + offset, size);
      const values = new Float32Array(size);
      for (let i = 0; i < size; i++) values[i] = table[halves[i]];
      tensors[name] = values;
    } else {
      tensors[name] = new Float32Array(bytes.buffer, bytes.byteOffset + offset, size);
    }
  }
  return tensors;
}

function load(data, weights) {
  const tensors = readTensors(data.tensors, fromBase64(weights), data.dtype);
  const model = new GPT(data.config, tensors);
  const tok = new CharTokenizer(data.tokenizer.chars, data.tokenizer.normalise);
  chatbot = new Chatbot(model, tok, data.template, data.reply_room);
  postMessage({ type: "ready" });
}

async function answer(id, history, sample, seed) {
  const controller = new AbortController();
  running.set(id, controller);
  const info = {};
  try {
    const options = { random: makeRandom(seed), signal: controller.signal, info };
    for await (const text of chatbot.answer(history, sample, options)) {
      if (controller.signal.aborted) break;
      postMessage({ type: "piece", id, text });
    }
    if (controller.signal.aborted) info.finish_reason = "stopped";
    postMessage({ type: "end", id, info });
  } catch (err) {
    postMessage({ type: "error", id, message: String(err && err.message ? err.message : err) });
  } finally {
    running.delete(id);
  }
}

onmessage = (event) => {
  const message = event.data;
  if (message.type === "load") {
    try {
      load(message.data, message.weights);
    } catch (err) {
      postMessage({ type: "error", id: null, message: "the model did not load: " + err.message });
    }
  } else if (message.type === "answer") {
    answer(message.id, message.history, message.sample, message.seed);
  } else if (message.type === "stop" && running.has(message.id)) {
    running.get(message.id).abort();
  }
};
