// The forward pass of tegaki/model.py, one token at a time with a KV cache, on the kernels of
// kernels.js. Read it beside model.py: the same five steps, the same parameter names.
//
//   1. tokens -> vectors       GPT.step: token embedding (+ learned position for GPT-2)
//   2. attention               attention(): q, k, v from one projection; RoPE; cache; softmax
//   3. MLP                     mlp(): GELU (GPT-2) or SwiGLU (Llama)
//   4. (2 and 3 per block, each added to the residual stream after a norm)
//   5. vectors -> logits       final norm, then the LM head (the embedding when tied)
//
// Sizes: C n_embd, H query heads, K key/value heads, D head_dim, I MLP width, V vocabulary,
// S the context the cache holds (block_size). Every vector lives in the kernels' memory, at a
// byte offset; `f32` is a Float32Array over that whole memory.
"use strict";

const WebModel = (() => {
  // --- the weights file: safetensors (8-byte header length, JSON header, raw tensors) ----------
  function readSafetensors(buffer) {
    const view = new DataView(buffer);
    const headerLength = Number(view.getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
    const start = 8 + headerLength;
    const tensors = {};
    for (const [name, info] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      const [begin, end] = info.data_offsets;
      tensors[name] = {dtype: info.dtype, shape: info.shape, bytes: new Uint8Array(buffer, start + begin, end - begin)};
    }
    return {metadata: header.__metadata__ || {}, tensors};
  }

  let halfTable = null;  // float16 bit pattern -> its float32 value, built once
  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);  // subnormal
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }

  // Widen a tensor to float32 into `out` (a Float32Array of its length): the page computes in float32.
  function widen(tensor, out) {
    const {dtype, bytes} = tensor;
    const n = out.length;
    if (dtype === "F32") {
      out.set(new Float32Array(bytes.slice().buffer));
    } else if (dtype === "F16") {
      halfTable = halfTable || Float32Array.from({length: 65536}, (_, h) => halfToFloat(h));
      const half = new Uint16Array(bytes.slice().buffer);
      for (let i = 0; i < n; i++) out[i] = halfTable[half[i]];
    } else if (dtype === "BF16") {  // bfloat16 is float32's top half
      const top = new Uint16Array(bytes.slice().buffer), bits = new Uint32Array(out.buffer, out.byteOffset, n);
      for (let i = 0; i < n; i++) bits[i] = top[i] << 16;
    } else {
      throw new Error(`weights of type ${dtype}: the page reads F32, F16 and BF16`);
    }
  }

  // The cache holds block_size tokens, or this many for models built for long contexts (Llama 3's
  // 131,072 positions would take gigabytes of cache). tegaki/web/export.py counts with it too.
  const MAX_CONTEXT = 2048;
  const numel = (shape) => shape.reduce((a, b) => a * b, 1);
  const align = (bytes) => Math.ceil(bytes / 16) * 16;

  class GPT {
    // config: the "config" of the weights file's metadata (tegaki/web/export.py, page_config)
    constructor(config, kernels, tensors) {
      const c = (this.config = config);
      this.k = kernels;
      const {n_embd: C, n_head: H, n_kv_head: K, head_dim: D, intermediate_size: I, vocab_size: V} = c;
      this.S = Math.min(c.block_size, MAX_CONTEXT);  // the longest context the cache holds

      // One reservation for everything, then pieces of it: the weights, the cache, the scratch.
      const scratch = {
        x: C, h: C, out: C, qkv: (H + 2 * K) * D, att: H * D, hidden: I, up: I, logits: V,
        probs: H * this.S, cos: D / 2, sin: D / 2,
      };
      let bytes = 0;
      for (const t of Object.values(tensors)) bytes += align(4 * numel(t.shape));
      bytes += 2 * c.n_layer * align(4 * this.S * K * D);
      for (const n of Object.values(scratch)) bytes += align(4 * n);
      let next = kernels.memory.reserve(bytes);
      const take = (floats) => { const at = next; next += align(4 * floats); return at; };

      this.w = {};  // parameter name (as in model.py's state_dict) -> offset
      for (const [name, t] of Object.entries(tensors)) {
        this.w[name] = take(numel(t.shape));
        widen(t, this.f32.subarray(this.w[name] >> 2, (this.w[name] >> 2) + numel(t.shape)));
      }
      // The cache: per layer, S positions of K key heads of D (and the same for values).
      this.cache = Array.from({length: c.n_layer}, () => ({keys: take(this.S * K * D), values: take(this.S * K * D)}));
      this.buf = Object.fromEntries(Object.entries(scratch).map(([name, n]) => [name, take(n)]));
      this.length = 0;  // positions in the cache
      this.attentionWeights = [];  // per layer, the last step's (H, length) weights
    }

    get f32() { return this.k.memory.f32; }
    param(name) { return this.w[name] || 0; }  // 0: absent (no bias in Llama-style layers)
    reset() { this.length = 0; }

    // model.py make_norm: LayerNorm (GPT-2) or RMSNorm (Llama), on one vector of C
    norm(prefix, out, x) {
      const c = this.config;
      if (c.norm === "rmsnorm") this.k.rms_norm(out, x, this.param(`${prefix}.weight`), c.n_embd, 1, c.norm_eps);
      else this.k.layer_norm(out, x, this.param(`${prefix}.weight`), this.param(`${prefix}.bias`), c.n_embd, c.norm_eps);
    }

    linear(prefix, out, x, rows, cols) {  // nn.Linear: weight (rows, cols), optional bias
      this.k.matvec(out, this.param(`${prefix}.weight`), x, this.param(`${prefix}.bias`), rows, cols);
    }

    // model.py Attention.forward for the token at `position`; reads buf.h, writes buf.out
    attention(layer, position) {
      const c = this.config, b = this.buf, p = `blocks.${layer}.attn`;
      const {n_embd: C, n_head: H, n_kv_head: K, head_dim: D} = c;
      // One matrix computes q, k and v together: H*D query channels, then K*D key, then K*D value.
      this.linear(`${p}.qkv`, b.qkv, b.h, (H + 2 * K) * D, C);
      const q = b.qkv, k = q + 4 * H * D, v = k + 4 * K * D;
      if (c.qk_norm) {  // Qwen3: RMSNorm over each query and key head before the rotation
        this.k.rms_norm(q, q, this.param(`${p}.q_norm.weight`), D, H, c.norm_eps);
        this.k.rms_norm(k, k, this.param(`${p}.k_norm.weight`), D, K, c.norm_eps);
      }
      if (c.pos_embedding === "rope") {
        this.k.rope(q, b.cos, b.sin, H, D);
        this.k.rope(k, b.cos, b.sin, K, D);
      }
      // Append this position's key and value heads to the cache; attend over all cached so far.
      const {keys, values} = this.cache[layer], row = position * K * D;
      this.f32.copyWithin((keys >> 2) + row, k >> 2, (k >> 2) + K * D);
      this.f32.copyWithin((values >> 2) + row, v >> 2, (v >> 2) + K * D);
      this.k.attention(b.att, q, keys, values, b.probs, H, K, D, position + 1, c.attn_scale);
      this.attentionWeights[layer] = this.f32.slice(b.probs >> 2, (b.probs >> 2) + H * (position + 1));
      this.linear(`${p}.o_proj`, b.out, b.att, C, H * D);  // heads side by side -> C
    }

    // model.py MLP (GELU) / SwiGLU: reads buf.h, writes buf.out
    mlp(layer) {
      const c = this.config, b = this.buf, p = `blocks.${layer}.mlp`, C = c.n_embd, I = c.intermediate_size;
      if (c.mlp === "swiglu") {
        this.linear(`${p}.gate`, b.hidden, b.h, I, C);
        this.linear(`${p}.up`, b.up, b.h, I, C);
        this.k.silu_mul(b.hidden, b.up, I);
        this.linear(`${p}.down`, b.out, b.hidden, C, I);
      } else {
        this.linear(`${p}.fc`, b.hidden, b.h, I, C);
        this.k.gelu_tanh(b.hidden, I);
        this.linear(`${p}.proj`, b.out, b.hidden, C, I);
      }
    }

    // cos and sin of this position's angles (rope.py rope_cos_sin), the attention factor included
    rotation(position) {
      const c = this.config, f = this.f32, cos = this.buf.cos >> 2, sin = this.buf.sin >> 2;
      c.rope_inv_freq.forEach((inv, i) => {
        const angle = Math.fround(position * inv);  // float32, as torch computes it
        f[cos + i] = Math.cos(angle) * c.rope_attention_factor;
        f[sin + i] = Math.sin(angle) * c.rope_attention_factor;
      });
    }

    // GPT.forward for one token after the cached ones: its next-token logits (V), a view that the
    // next step overwrites.
    step(token) {
      const c = this.config, b = this.buf, f = this.f32, C = c.n_embd, position = this.length;
      if (position >= this.S) throw new Error(`the context is full: this model holds ${this.S} tokens (block_size)`);
      if (!(token >= 0 && token < c.vocab_size)) throw new Error(`token id ${token} is outside the vocabulary`);
      // Step 1: tokens -> vectors.
      f.copyWithin(b.x >> 2, (this.w["wte.weight"] >> 2) + token * C, (this.w["wte.weight"] >> 2) + (token + 1) * C);
      if (c.pos_embedding === "learned") this.k.add(b.x, this.w["wpe.weight"] + 4 * position * C, C);
      if (c.pos_embedding === "rope") this.rotation(position);
      // Steps 2-4: the blocks, pre-norm, each adding to the residual stream x.
      for (let layer = 0; layer < c.n_layer; layer++) {
        this.norm(`blocks.${layer}.ln_1`, b.h, b.x);
        this.attention(layer, position);
        this.k.add(b.x, b.out, C);
        this.norm(`blocks.${layer}.ln_2`, b.h, b.x);
        this.mlp(layer);
        this.k.add(b.x, b.out, C);
      }
      this.length += 1;
      // Step 5: vectors -> logits (a tied head is the embedding matrix itself).
      if (c.final_norm) this.norm("ln_f", b.h, b.x);
      else f.copyWithin(b.h >> 2, b.x >> 2, (b.x >> 2) + C);
      const head = c.tie_embeddings ? this.w["wte.weight"] : this.w["lm_head.weight"];
      this.k.matvec(b.logits, head, b.h, 0, c.vocab_size, C);
      return f.subarray(b.logits >> 2, (b.logits >> 2) + c.vocab_size);
    }
  }

  // Fetch and place the weights; `kernels` from Kernels.load.
  // The file's bytes, telling `progress(received, total)` as they arrive (GPT-2 small is 250 MB).
  async function download(url, progress) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
    const total = Number(response.headers.get("Content-Length")) || 0;
    if (!response.body || !total) return response.arrayBuffer();
    const bytes = new Uint8Array(total), reader = response.body.getReader();
    for (let received = 0; ;) {
      const {done, value} = await reader.read();
      if (done) return bytes.buffer;
      bytes.set(value, received);
      received += value.length;
      progress(received, total);
    }
  }

  async function load(url, kernels, progress = () => {}) {
    const {metadata, tensors} = readSafetensors(await download(url, progress));
    const info = JSON.parse(metadata.tegaki_web);
    const model = new GPT(info.config, kernels, tensors);
    model.name = info.name;
    model.parameters = info.parameters;
    return model;
  }

  return {load, GPT, readSafetensors};
})();
