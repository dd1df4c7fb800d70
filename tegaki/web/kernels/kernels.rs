//! The browser's kernels: the maths of tegaki/model.py for one token at a time, written out.
//!
//! Built to WebAssembly with wasm simd128 (`make web`, see tegaki/web/build.py): four f32 lanes per
//! instruction for the dot products, which are nearly all of the work. kernels.js holds the same
//! functions in plain JavaScript, for a browser without wasm SIMD, with the same arguments.
//!
//! Memory: the page (model.js) owns everything past the module's own data. It grows the memory,
//! places the weights, the KV cache and the scratch vectors there, and passes their byte offsets.
//! The kernels never allocate, so Rust's allocator never competes with the page for that space.
//!
//! Every function names its twin in tegaki/model.py; the tests hold the page's logits to tegaki's.

use core::arch::wasm32::*;
use core::slice::{from_raw_parts, from_raw_parts_mut};

/// sum_i a[i] * b[i], four lanes at a time with four accumulators (16 floats per turn, so the
/// additions do not wait on each other), then the tail one by one.
#[inline(always)]
unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc0 = f32x4_splat(0.0);
    let mut acc1 = f32x4_splat(0.0);
    let mut acc2 = f32x4_splat(0.0);
    let mut acc3 = f32x4_splat(0.0);
    let mut i = 0;
    while i + 16 <= n {
        let pa = a.add(i) as *const v128;
        let pb = b.add(i) as *const v128;
        acc0 = f32x4_add(acc0, f32x4_mul(v128_load(pa), v128_load(pb)));
        acc1 = f32x4_add(acc1, f32x4_mul(v128_load(pa.add(1)), v128_load(pb.add(1))));
        acc2 = f32x4_add(acc2, f32x4_mul(v128_load(pa.add(2)), v128_load(pb.add(2))));
        acc3 = f32x4_add(acc3, f32x4_mul(v128_load(pa.add(3)), v128_load(pb.add(3))));
        i += 16;
    }
    while i + 4 <= n {
        acc0 = f32x4_add(acc0, f32x4_mul(v128_load(a.add(i) as *const v128), v128_load(b.add(i) as *const v128)));
        i += 4;
    }
    let acc = f32x4_add(f32x4_add(acc0, acc1), f32x4_add(acc2, acc3));
    let mut sum = f32x4_extract_lane::<0>(acc) + f32x4_extract_lane::<1>(acc)
        + f32x4_extract_lane::<2>(acc) + f32x4_extract_lane::<3>(acc);
    while i < n {
        sum += *a.add(i) * *b.add(i);
        i += 1;
    }
    sum
}

/// y[i] += s * x[i] (the attention's weighted sum of values), four lanes at a time.
#[inline(always)]
unsafe fn axpy(y: *mut f32, s: f32, x: *const f32, n: usize) {
    let sv = f32x4_splat(s);
    let mut i = 0;
    while i + 4 <= n {
        let py = y.add(i) as *mut v128;
        v128_store(py, f32x4_add(v128_load(py), f32x4_mul(sv, v128_load(x.add(i) as *const v128))));
        i += 4;
    }
    while i < n {
        *y.add(i) += s * *x.add(i);
        i += 1;
    }
}

/// nn.Linear for one token: out[r] = w[r, :] . x + bias[r]. w is stored as torch stores it,
/// (rows = out features, cols = in features), so each output is one contiguous dot product.
/// bias 0: none.
#[no_mangle]
pub unsafe extern "C" fn matvec(out: *mut f32, w: *const f32, x: *const f32, bias: *const f32, rows: usize, cols: usize) {
    for r in 0..rows {
        let b = if bias.is_null() { 0.0 } else { *bias.add(r) };
        *out.add(r) = dot(w.add(r * cols), x, cols) + b;
    }
}

/// model.py: layer_norm_reference. Centre, divide by the standard deviation (biased variance),
/// scale, shift. bias 0: none.
#[no_mangle]
pub unsafe extern "C" fn layer_norm(out: *mut f32, x: *const f32, weight: *const f32, bias: *const f32, n: usize, eps: f32) {
    let xs = from_raw_parts(x, n);
    let out = from_raw_parts_mut(out, n);
    let mean = xs.iter().sum::<f32>() / n as f32;
    let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for i in 0..n {
        let b = if bias.is_null() { 0.0 } else { *bias.add(i) };
        out[i] = (xs[i] - mean) * inv * *weight.add(i) + b;
    }
}

/// model.py: rms_norm_reference. Divide by the root mean square (no centring), then scale.
/// `count` vectors of n side by side (QK-norm normalises each head on its own). out may be x:
/// each vector is read whole before it is written.
#[no_mangle]
pub unsafe extern "C" fn rms_norm(out: *mut f32, x: *const f32, weight: *const f32, n: usize, count: usize, eps: f32) {
    for c in 0..count {
        let (v, o) = (x.add(c * n), out.add(c * n));
        let mut sum_squares = 0.0;
        for i in 0..n {
            sum_squares += *v.add(i) * *v.add(i);
        }
        let inv = 1.0 / (sum_squares / n as f32 + eps).sqrt();
        for i in 0..n {
            *o.add(i) = *weight.add(i) * (*v.add(i) * inv);
        }
    }
}

/// model.py: gelu_tanh_reference, in place. GPT-2's GELU is the tanh approximation.
#[no_mangle]
pub unsafe extern "C" fn gelu_tanh(x: *mut f32, n: usize) {
    let xs = from_raw_parts_mut(x, n);
    let c = (2.0f32 / core::f32::consts::PI).sqrt();
    for v in xs.iter_mut() {
        let u = *v;
        *v = 0.5 * u * (1.0 + (c * (u + 0.044715 * u * u * u)).tanh());
    }
}

/// model.py: SwiGLU.forward's silu(gate(x)) * up(x), in place into gate. silu(g) = g * sigmoid(g).
#[no_mangle]
pub unsafe extern "C" fn silu_mul(gate: *mut f32, up: *const f32, n: usize) {
    let gs = from_raw_parts_mut(gate, n);
    let us = from_raw_parts(up, n);
    for i in 0..n {
        let g = gs[i];
        gs[i] = g / (1.0 + (-g).exp()) * us[i];
    }
}

/// rope.py: apply_rope, in place, on `heads` heads of head_dim each, for one position. cos and sin
/// hold head_dim / 2 values (attention factor included): channel i pairs with channel i + d/2 (the
/// half-split convention of transformers), and the pair (a, b) turns to (a cos - b sin, b cos + a sin).
#[no_mangle]
pub unsafe extern "C" fn rope(x: *mut f32, cos: *const f32, sin: *const f32, heads: usize, head_dim: usize) {
    let half = head_dim / 2;
    for h in 0..heads {
        let v = from_raw_parts_mut(x.add(h * head_dim), head_dim);
        for i in 0..half {
            let (a, b) = (v[i], v[i + half]);
            let (c, s) = (*cos.add(i), *sin.add(i));
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}

/// model.py: Attention._attend_written_out for one query over the n_keys cached positions:
/// softmax(q k^T * scale) v per head. The cache holds, per position, K key heads of head_dim
/// (kv_stride = K * head_dim floats per position); query head h reads key/value head h / (H / K),
/// which is GQA's sharing. Nothing is masked: every cached key is in this query's past.
/// probs (H * n_keys) keeps the attention weights, which the page draws.
#[no_mangle]
pub unsafe extern "C" fn attention(
    out: *mut f32,
    q: *const f32,
    k_cache: *const f32,
    v_cache: *const f32,
    probs: *mut f32,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    n_keys: usize,
    scale: f32,
) {
    let group = n_head / n_kv_head;
    let kv_stride = n_kv_head * head_dim;
    for h in 0..n_head {
        let kv = h / group;
        let qh = q.add(h * head_dim);
        let p = from_raw_parts_mut(probs.add(h * n_keys), n_keys);
        for s in 0..n_keys {
            p[s] = dot(qh, k_cache.add(s * kv_stride + kv * head_dim), head_dim) * scale;
        }
        softmax(p.as_mut_ptr(), n_keys);
        let oh = out.add(h * head_dim);
        from_raw_parts_mut(oh, head_dim).fill(0.0);
        for s in 0..n_keys {
            axpy(oh, p[s], v_cache.add(s * kv_stride + kv * head_dim), head_dim);
        }
    }
}

/// model.py: softmax_reference, in place: subtract the max (exp cannot overflow), exponentiate,
/// divide by the sum.
#[no_mangle]
pub unsafe extern "C" fn softmax(x: *mut f32, n: usize) {
    let xs = from_raw_parts_mut(x, n);
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in xs.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in xs.iter_mut() {
        *v /= sum;
    }
}

/// The residual stream: x += y (Block.forward's `x = x + ...`).
#[no_mangle]
pub unsafe extern "C" fn add(x: *mut f32, y: *const f32, n: usize) {
    axpy(x, 1.0, y, n);
}
