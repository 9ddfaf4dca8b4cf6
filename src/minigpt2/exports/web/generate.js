// Generation, as core/generate.py (sampling) and core/stream.py (the chatbot's streams of ids and
// of text): read them side by side.
//
// generateIds is the loop: feed the prompt once (filling the KV cache), then one id at a time,
// each drawn from the last position's logits after the repetition penalty, temperature, top-k and
// top-p; stop ids end it, and cannot come first while fewer than minNewTokens ids exist (a chatbot's
// answer is never empty). Past the context window the window slides as in Python: when it is full,
// keep the newest block_size / 2 ids and refill the cache from them. decodeStream turns ids into
// text and ends before the first stop string.
//
// The streams are async generators: after each id, generateIds lets the worker read its messages
// (a Stop arrives as signal.aborted), which a plain loop would hold back until the answer ended.
"use strict";

// A seeded pseudo-random generator (mulberry32): numbers in [0, 1), the same ones for the same
// seed in every browser. Seeds above 2^32 are folded into 32 bits.
function makeRandom(seed) {
  let a = ((seed % 2 ** 32) ^ Math.floor(seed / 2 ** 32)) >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

// Draw one id from a position's logits (V,): greedy at temperature 0.
function sample(logits, temperature, top_k, top_p, random) {
  if (temperature === 0) return argmax(logits);
  let scaled = Float64Array.from(logits, (x) => x / temperature);
  scaled = topPFilter(topKFilter(scaled, top_k), top_p);
  const probs = softmax(scaled);
  let u = random();  // walk the distribution until u is used up
  let last = 0;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] === 0) continue;
    last = i;
    u -= probs[i];
    if (u < 0) return i;
  }
  return last;  // u was within rounding of 1
}

// The first largest, as torch.argmax.
function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

function softmax(logits) {
  const max = logits.reduce((a, b) => Math.max(a, b), -Infinity);
  const exps = logits.map((x) => Math.exp(x - max));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / total);
}

// Make ids already in `context` less likely (CTRL-style): positive logits divided by `penalty`,
// negative ones multiplied. logits: (V,), context: the window's ids.
function applyRepetitionPenalty(logits, context, penalty) {
  if (penalty === 1 || context.length === 0) return logits;
  const out = Float32Array.from(logits);
  for (const id of new Set(context)) out[id] = logits[id] > 0 ? logits[id] / penalty : logits[id] * penalty;
  return out;
}

// Keep the k largest logits, set the rest to -Infinity; k = 0 keeps all. (V,) -> (V,).
function topKFilter(logits, k) {
  if (k <= 0 || k >= logits.length) return logits;
  const kth = Float64Array.from(logits).sort().reverse()[k - 1];
  return logits.map((x) => (x < kth ? -Infinity : x));
}

// Nucleus filter: keep the smallest set of ids whose probabilities sum to >= p. (V,) -> (V,).
function topPFilter(logits, p) {
  if (p >= 1) return logits;
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
  const probs = softmax(Float64Array.from(order, (i) => logits[i]));
  const out = Float64Array.from(logits);
  let cumulative = 0;
  order.forEach((id, rank) => {
    // Drop an id when the ids before it already reach p; the likeliest id always stays.
    if (cumulative >= p) out[id] = -Infinity;
    cumulative += probs[rank];
  });
  return out;
}

// Pick the next id from the last position's logits (V,), given the ids in the window.
function nextToken(logits, cfg, context, random) {
  const penalised = applyRepetitionPenalty(logits, context, cfg.repetition_penalty);
  return sample(penalised, cfg.temperature, cfg.top_k, cfg.top_p, random);
}

// Let the worker's message queue run (a Stop), without setTimeout's 4 ms clamp on nested timers.
function nextTurn() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

// Yield up to cfg.max_new_tokens new ids after `prompt`; stop before any of `stopIds`.
async function* generateIds(model, prompt, cfg, { stopIds = [], random, minNewTokens = 0, signal = null }) {
  if (prompt.length === 0) throw new Error("generation needs at least one prompt id");
  const block = model.config.block_size;
  const keep = Math.max(1, Math.floor(block / 2));  // ids kept when the window slides
  const stops = new Set(stopIds);
  const tokens = prompt.slice();
  let start = Math.max(0, tokens.length - block);  // the window is tokens[start:]
  const cache = new KVCache(model.config);
  for (let n = 0; n < cfg.max_new_tokens; n++) {
    if (tokens.length - start > block) {  // window full: slide it, refill the cache
      start = tokens.length - keep;
      cache.reset();
    }
    const fed = start + cache.pos;  // ids already in the cache end here
    let last = model.forward(tokens.slice(fed), cache);  // (V,): T = 1 once the cache is filled
    if (tokens.length - prompt.length < minNewTokens && stops.size > 0) {
      last = Float32Array.from(last);
      for (const id of stops) last[id] = -Infinity;
    }
    // The window's ids matter only to the repetition penalty; skip copying them otherwise.
    const window = cfg.repetition_penalty !== 1 ? tokens.slice(start) : [];
    const next = nextToken(last, cfg, window, random);
    if (stops.has(next)) return;
    tokens.push(next);
    yield next;
    await nextTurn();
    if (signal && signal.aborted) return;
  }
}

// Turn a stream of new ids into text pieces, ending before the first stop string. Text that might
// be the start of a stop string is held back until it is clear that it is not; skipIds are
// generated and kept in the context, but not shown.
async function* decodeStream(ids, tokenizer, { stopStrings = [], skipIds = [] }) {
  const hidden = new Set(skipIds);
  let held = "";
  const longest = Math.max(0, ...stopStrings.map((s) => s.length));
  for await (const id of ids) {
    if (hidden.has(id)) continue;
    held += tokenizer.decode([id]);
    const hits = stopStrings.filter((s) => held.includes(s)).map((s) => held.indexOf(s));
    if (hits.length > 0) {
      if (Math.min(...hits) > 0) yield held.slice(0, Math.min(...hits));
      return;
    }
    // Everything except a tail that could still begin a stop string is safe to show.
    let couldBegin = 0;
    for (let n = 1; n < Math.min(longest, held.length + 1); n++) {
      if (endsWithPrefix(held, stopStrings, n)) couldBegin = n;
    }
    const safe = held.length - couldBegin;
    if (safe > 0) {
      yield held.slice(0, safe);
      held = held.slice(safe);
    }
  }
  if (held) yield held;
}

// Whether the last n characters of text are the first n of some stop string.
function endsWithPrefix(text, stops, n) {
  return stops.some((s) => s.length > n && text.endsWith(s.slice(0, n)));
}
