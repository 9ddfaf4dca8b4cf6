// GPT-2, exactly, at character level, in plain JavaScript: read it beside core/model.py.
//
// The same pieces in the same order, with the same names: the KV cache, attention, MLP, block, then
// the model. Parameters keep Hugging Face's names (transformer.h.0.attn.c_attn.weight ...) and
// PyTorch's nn.Linear layout, (out, in), row-major.
//
// Shapes use model.py's letters: T new positions, Tk positions attended to (cached + new),
// C = n_embd, nh = n_head, hs = C / nh, V = vocab_size. There is no batch axis (B = 1: a page talks
// to one person). A tensor is a flat Float32Array; a comment gives its shape. Sums are taken in
// JavaScript's doubles and stored as float32, so results agree with PyTorch's fp32 to about 1e-6.
"use strict";

class KVCache {
  // Keys and values of the positions already processed, so that generating one more token costs
  // one position's work instead of the whole window's. Per layer, k and v are (nh, block_size, hs);
  // pos is how many positions are filled.
  constructor(config) {
    const size = config.n_embd * config.block_size;  // nh * block_size * hs
    this.config = config;
    this.k = Array.from({ length: config.n_layer }, () => new Float32Array(size));
    this.v = Array.from({ length: config.n_layer }, () => new Float32Array(size));
    this.pos = 0;
  }

  // Store this layer's new keys and values, from qkv (T, 3C) laid out as [q | k | v] per position.
  update(layer, qkv, T) {
    const { n_embd: C, n_head: nh, block_size } = this.config;
    const hs = C / nh;
    for (let t = 0; t < T; t++) {
      for (let h = 0; h < nh; h++) {
        const to = (h * block_size + this.pos + t) * hs;  // [h, pos + t, :]
        const from = t * 3 * C + h * hs;
        this.k[layer].set(qkv.subarray(from + C, from + C + hs), to);
        this.v[layer].set(qkv.subarray(from + 2 * C, from + 2 * C + hs), to);
      }
    }
  }

  reset() {
    this.pos = 0;
  }
}

// y = x W^T + b, as nn.Linear: x (T, nIn), weight (nOut, nIn), bias (nOut) or null -> y (T, nOut).
// Each output is a dot product of a weight row with an input row, kept in four running sums: the
// additions then need not wait for each other, which makes the whole model 1.4x faster in V8.
function linear(x, T, weight, bias, nIn, nOut) {
  const y = new Float32Array(T * nOut);
  for (let t = 0; t < T; t++) {
    const row = t * nIn;
    for (let o = 0; o < nOut; o++) {
      const w = o * nIn;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0, i = 0;
      for (; i + 3 < nIn; i += 4) {
        s0 += weight[w + i] * x[row + i];
        s1 += weight[w + i + 1] * x[row + i + 1];
        s2 += weight[w + i + 2] * x[row + i + 2];
        s3 += weight[w + i + 3] * x[row + i + 3];
      }
      for (; i < nIn; i++) s0 += weight[w + i] * x[row + i];
      y[t * nOut + o] = (bias ? bias[o] : 0) + (s0 + s1) + (s2 + s3);
    }
  }
  return y;
}

// nn.LayerNorm(C, eps=1e-5) over each row of x (T, C) -> (T, C).
function layerNorm(x, T, C, weight, bias) {
  const y = new Float32Array(T * C);
  for (let t = 0; t < T; t++) {
    const row = t * C;
    let mean = 0;
    for (let i = 0; i < C; i++) mean += x[row + i];
    mean /= C;
    let variance = 0;  // biased, as PyTorch's LayerNorm
    for (let i = 0; i < C; i++) variance += (x[row + i] - mean) ** 2;
    const scale = 1 / Math.sqrt(variance / C + 1e-5);
    for (let i = 0; i < C; i++) y[row + i] = (x[row + i] - mean) * scale * weight[i] + bias[i];
  }
  return y;
}

// GELU, tanh approximation (GPT-2's, nn.GELU(approximate="tanh")), in place.
function gelu(x) {
  const c = Math.sqrt(2 / Math.PI);
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    x[i] = 0.5 * v * (1 + Math.tanh(c * (v + 0.044715 * v * v * v)));
  }
  return x;
}

// Multi-head self-attention where each position sees only itself and the past.
// x: (T, C) -> (T, C); the T positions continue the cache's cache.pos positions.
function causalSelfAttention(p, x, T, cache, layer, config) {
  const { n_embd: C, n_head: nh, block_size } = config;
  const hs = C / nh;
  const qkv = linear(x, T, p.c_attn.weight, p.c_attn.bias, C, 3 * C);  // (T, 3C): q, k, v at once
  cache.update(layer, qkv, T);  // keys and values of these T, after the cached ones
  const k = cache.k[layer], v = cache.v[layer];  // (nh, block_size, hs), filled to pos + T
  const y = new Float32Array(T * C);  // (T, C): the heads side by side, as after transpose + view
  const scale = 1 / Math.sqrt(hs);
  const att = new Float32Array(cache.pos + T);  // one query's weights over its keys
  for (let t = 0; t < T; t++) {
    const Tk = cache.pos + t + 1;  // causal: query t (absolute position pos + t) sees keys 0 .. pos + t
    for (let h = 0; h < nh; h++) {
      const q = t * 3 * C + h * hs;  // this head's query, qkv[t, h*hs : (h+1)*hs]
      const base = h * block_size * hs;
      let max = -Infinity;
      for (let j = 0; j < Tk; j++) {  // similarity scores q . k_j / sqrt(hs)
        let dot = 0;
        for (let i = 0; i < hs; i++) dot += qkv[q + i] * k[base + j * hs + i];
        att[j] = dot * scale;
        if (att[j] > max) max = att[j];
      }
      let total = 0;  // softmax over the keys (minus the max, so exp cannot overflow)
      for (let j = 0; j < Tk; j++) {
        att[j] = Math.exp(att[j] - max);
        total += att[j];
      }
      const out = t * C + h * hs;
      for (let i = 0; i < hs; i++) {  // weighted average of the values
        let sum = 0;
        for (let j = 0; j < Tk; j++) sum += att[j] * v[base + j * hs + i];
        y[out + i] = sum / total;
      }
    }
  }
  return linear(y, T, p.c_proj.weight, p.c_proj.bias, C, C);  // heads back into the residual stream
}

// Position-wise feed-forward: C -> 4C -> GELU (tanh) -> C. x: (T, C) -> (T, C).
function mlp(p, x, T, C) {
  const h = gelu(linear(x, T, p.c_fc.weight, p.c_fc.bias, C, 4 * C));  // (T, 4C)
  return linear(h, T, p.c_proj.weight, p.c_proj.bias, 4 * C, C);
}

// Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x: (T, C), updated in place.
function block(p, x, T, cache, layer, config) {
  const C = config.n_embd;
  const a = causalSelfAttention(p.attn, layerNorm(x, T, C, p.ln_1.weight, p.ln_1.bias), T, cache, layer, config);
  for (let i = 0; i < x.length; i++) x[i] += a[i];
  const m = mlp(p.mlp, layerNorm(x, T, C, p.ln_2.weight, p.ln_2.bias), T, C);
  for (let i = 0; i < x.length; i++) x[i] += m[i];
  return x;
}

class GPT {
  // Token + position embeddings, n_layer blocks, final LayerNorm, LM head tied to wte.
  // tensors: { "transformer.wte.weight": Float32Array, ... } by their PyTorch names.
  constructor(config, tensors) {
    const get = (name) => {
      if (!(name in tensors)) throw new Error("the page has no weights for " + name);
      return tensors[name];
    };
    const linearNamed = (prefix) => ({ weight: get(prefix + ".weight"), bias: get(prefix + ".bias") });
    this.config = config;
    this.transformer = {
      wte: { weight: get("transformer.wte.weight") },  // (V, C) token embeddings
      wpe: { weight: get("transformer.wpe.weight") },  // (block_size, C) learned position embeddings
      h: Array.from({ length: config.n_layer }, (_, i) => {
        const at = "transformer.h." + i;
        return {
          ln_1: linearNamed(at + ".ln_1"),
          attn: { c_attn: linearNamed(at + ".attn.c_attn"), c_proj: linearNamed(at + ".attn.c_proj") },
          ln_2: linearNamed(at + ".ln_2"),
          mlp: { c_fc: linearNamed(at + ".mlp.c_fc"), c_proj: linearNamed(at + ".mlp.c_proj") },
        };
      }),
      ln_f: linearNamed("transformer.ln_f"),
    };
    // Weight tying: reading a character in and writing it out share one matrix (GPT-2 does).
    this.lm_head = { weight: this.transformer.wte.weight };
  }

  // idx: T token ids continuing the cache's positions -> logits (V) of the last one: what comes
  // next. The cache advances by T.
  forward(idx, cache) {
    const { n_embd: C, vocab_size: V, block_size } = this.config;
    const T = idx.length, start = cache.pos;
    if (start + T > block_size) {
      throw new Error(`${start + T} positions exceed the context window of ${block_size}`);
    }
    const { wte, wpe, h, ln_f } = this.transformer;
    const x = new Float32Array(T * C);  // (T, C) = wte(idx) + wpe(pos)
    for (let t = 0; t < T; t++) {
      for (let i = 0; i < C; i++) x[t * C + i] = wte.weight[idx[t] * C + i] + wpe.weight[(start + t) * C + i];
    }
    h.forEach((p, layer) => block(p, x, T, cache, layer, this.config));
    cache.pos += T;
    // Only the last position goes through the head; ln_f works row by row, so it needs that row only.
    const last = layerNorm(x.subarray((T - 1) * C), 1, C, ln_f.weight, ln_f.bias);  // (1, C)
    return linear(last, 1, this.lm_head.weight, null, C, V);  // (V,)
  }
}
