// The kernels: WebAssembly built from tegaki/web/kernels/kernels.rs (wasm simd128) where the browser
// has it, else the same functions below in plain JavaScript. Both take the same arguments: byte
// offsets into one memory that model.js fills (weights, KV cache, scratch vectors), and sizes.
// Offset 0 means "none" (a missing bias). Each function names its twin in tegaki/model.py.
"use strict";

const Kernels = (() => {
  const PAGE = 65536;  // bytes in a WebAssembly memory page

  // ---------------------------------------------------------------------------------------------
  // The fallback: plain JavaScript over a Float32Array of the whole memory (index = offset / 4).
  // ---------------------------------------------------------------------------------------------
  function plain(memory) {
    const F = () => memory.f32;

    function dot(F, a, b, n) {
      let sum = 0;
      for (let i = 0; i < n; i++) sum += F[a + i] * F[b + i];
      return sum;
    }

    function softmaxAt(f, x, n) {
      let max = -Infinity;
      for (let i = x; i < x + n; i++) max = Math.max(max, f[i]);
      let sum = 0;
      for (let i = x; i < x + n; i++) { f[i] = Math.exp(f[i] - max); sum += f[i]; }
      for (let i = x; i < x + n; i++) f[i] /= sum;
    }

    return {
      // nn.Linear for one token: out[r] = w[r, :] . x + bias[r]  (w is (out features, in features))
      matvec(out, w, x, bias, rows, cols) {
        const f = F(); out >>= 2; w >>= 2; x >>= 2; bias >>= 2;
        for (let r = 0; r < rows; r++) f[out + r] = dot(f, w + r * cols, x, cols) + (bias ? f[bias + r] : 0);
      },
      // layer_norm_reference: centre, divide by the standard deviation (biased), scale, shift
      layer_norm(out, x, weight, bias, n, eps) {
        const f = F(); out >>= 2; x >>= 2; weight >>= 2; bias >>= 2;
        let mean = 0;
        for (let i = 0; i < n; i++) mean += f[x + i];
        mean /= n;
        let variance = 0;
        for (let i = 0; i < n; i++) variance += (f[x + i] - mean) ** 2;
        const inv = 1 / Math.sqrt(variance / n + eps);
        for (let i = 0; i < n; i++) f[out + i] = (f[x + i] - mean) * inv * f[weight + i] + (bias ? f[bias + i] : 0);
      },
      // rms_norm_reference, on `count` vectors of n side by side (QK-norm: each head on its own)
      rms_norm(out, x, weight, n, count, eps) {
        const f = F(); out >>= 2; x >>= 2; weight >>= 2;
        for (let c = 0; c < count; c++) {
          const o = out + c * n, v = x + c * n;
          let meanSquare = 0;
          for (let i = 0; i < n; i++) meanSquare += f[v + i] * f[v + i];
          const inv = 1 / Math.sqrt(meanSquare / n + eps);
          for (let i = 0; i < n; i++) f[o + i] = f[weight + i] * (f[v + i] * inv);
        }
      },
      // gelu_tanh_reference, in place
      gelu_tanh(x, n) {
        const f = F(); x >>= 2;
        const c = Math.sqrt(2 / Math.PI);
        for (let i = x; i < x + n; i++) {
          const u = f[i];
          f[i] = 0.5 * u * (1 + Math.tanh(c * (u + 0.044715 * u * u * u)));
        }
      },
      // SwiGLU: silu(gate) * up, into gate
      silu_mul(gate, up, n) {
        const f = F(); gate >>= 2; up >>= 2;
        for (let i = 0; i < n; i++) {
          const g = f[gate + i];
          f[gate + i] = g / (1 + Math.exp(-g)) * f[up + i];
        }
      },
      // rope.py apply_rope: the pair (x[i], x[i + d/2]) turns by the position's angle i
      rope(x, cos, sin, heads, headDim) {
        const f = F(); x >>= 2; cos >>= 2; sin >>= 2;
        const half = headDim / 2;
        for (let h = 0; h < heads; h++) {
          const v = x + h * headDim;
          for (let i = 0; i < half; i++) {
            const a = f[v + i], b = f[v + i + half], c = f[cos + i], s = f[sin + i];
            f[v + i] = a * c - b * s;
            f[v + i + half] = b * c + a * s;
          }
        }
      },
      // Attention._attend_written_out for one query over the cached keys; probs keeps the weights
      attention(out, q, kCache, vCache, probs, nHead, nKvHead, headDim, nKeys, scale) {
        const f = F(); out >>= 2; q >>= 2; kCache >>= 2; vCache >>= 2; probs >>= 2;
        const group = nHead / nKvHead, stride = nKvHead * headDim;
        for (let h = 0; h < nHead; h++) {
          const kv = Math.floor(h / group) * headDim, qh = q + h * headDim, p = probs + h * nKeys;
          for (let s = 0; s < nKeys; s++) f[p + s] = dot(f, qh, kCache + s * stride + kv, headDim) * scale;
          softmaxAt(f, p, nKeys);
          const o = out + h * headDim;
          f.fill(0, o, o + headDim);
          for (let s = 0; s < nKeys; s++) {
            const w = f[p + s], v = vCache + s * stride + kv;
            for (let d = 0; d < headDim; d++) f[o + d] += w * f[v + d];
          }
        }
      },
      // softmax_reference, in place
      softmax(x, n) {
        softmaxAt(F(), x >> 2, n);
      },
      // the residual stream: x += y
      add(x, y, n) {
        const f = F(); x >>= 2; y >>= 2;
        for (let i = 0; i < n; i++) f[x + i] += f[y + i];
      },
    };
  }

  // ---------------------------------------------------------------------------------------------
  // The memory both share: model.js reserves what it needs once, then hands out pieces of it.
  // ---------------------------------------------------------------------------------------------
  function wasmMemory(instance) {
    const memory = instance.exports.memory;
    return {
      base: 0,
      f32: new Float32Array(memory.buffer),
      reserve(bytes) {  // past the module's own data and stack, which the kernels alone use
        const start = memory.buffer.byteLength;
        memory.grow(Math.ceil(bytes / PAGE));
        this.f32 = new Float32Array(memory.buffer);  // growing detaches the old view
        this.base = start;
        return start;
      },
    };
  }

  function plainMemory() {
    return {
      base: 0,
      f32: new Float32Array(0),
      reserve(bytes) {
        const start = 16;  // offset 0 stays "none"
        this.f32 = new Float32Array((start + bytes) / 4);
        this.base = start;
        return start;
      },
    };
  }

  async function wasmKernels(url) {
    const bytes = await (await fetch(url)).arrayBuffer();
    if (!WebAssembly.validate(bytes)) return null;  // no simd128 in this browser
    const {instance} = await WebAssembly.instantiate(bytes, {});
    const memory = wasmMemory(instance);
    const e = instance.exports;
    const names = ["matvec", "layer_norm", "rms_norm", "gelu_tanh", "silu_mul", "rope", "attention", "softmax", "add"];
    return {name: "wasm-simd128", memory, ...Object.fromEntries(names.map((n) => [n, e[n]]))};
  }

  // `which`: "wasm" or "js" to force one; otherwise wasm where the browser runs it.
  async function load(url, which) {
    if (which !== "js" && typeof WebAssembly === "object") {
      try {
        const kernels = await wasmKernels(url);
        if (kernels) return kernels;
      } catch (error) {
        if (which === "wasm") throw error;
        console.warn("tegaki: WebAssembly kernels unavailable, using JavaScript:", error);
      }
    }
    const memory = plainMemory();
    return {name: "javascript", memory, ...plain(memory)};
  }

  return {load};
})();
