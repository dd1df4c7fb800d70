// A float32 or bfloat16 weight times a few rows: F.linear for a decode step, written as the loop it is.
//
//     y[r, o] = bias[o] + x[r] . W[o]
//
// A decode step multiplies one row (or a batch's few) by every weight matrix, so its time is the time
// to stream each weight from memory once. This loop streams it: each row of W is read once, in order,
// asked for PREFETCH_AHEAD bytes before it is used, and multiplied into every row of x while it is in
// registers. The outputs are split across PyTorch's threads. decoding.py times it beside PyTorch's own
// kernels on the model's shapes and keeps it where it is faster ("loop").
//
// LANES at a time, in GCC/Clang vector types: eight floats, an AVX2 register, also where the CPU has
// AVX-512. The loop waits on memory, not on arithmetic, and with sixteen-float registers it read the
// weights more slowly on the AMD Zen 4 it was measured on (benchmarks/RESULTS.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "tensors.h"

#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX2__)
constexpr int LANES = 8;
#else
constexpr int LANES = 4;
#endif
typedef float floats __attribute__((vector_size(4 * LANES), aligned(4)));  // LANES float32s

static inline floats load_floats(const float* p) { return *reinterpret_cast<const floats*>(p); }

// LANES bfloat16 weights made float32: a bfloat16 is the upper half of a float32's bits, so each
// 16-bit number is widened and moved up 16 bits.
static inline floats load_floats(const at::BFloat16* p) {
#if defined(__AVX2__)
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (floats)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
#else
  floats v;
  for (int k = 0; k < LANES; ++k) v[k] = float(p[k]);
  return v;
#endif
}

static inline float sum_lanes(floats v) {
  float s = 0.f;
  for (int k = 0; k < LANES; ++k) s += v[k];
  return s;
}

constexpr int64_t PREFETCH_AHEAD = 2048;  // bytes: the CPU's own prefetcher alone lets the loop wait

// One weight row (W: float or at::BFloat16) against ROWS float rows of x (ROWS a template argument:
// the sums stay in registers).
template <int ROWS, typename W, typename Y>
static void row_times_rows(const W* w, const float* x, int64_t in, float bias, Y* y, int64_t y_stride) {
  constexpr int64_t LINE = 64 / sizeof(W);  // weights per cache line
  const int64_t iv = in / LANES * LANES;    // inputs taken LANES at a time
  floats acc[ROWS] = {};
  for (int64_t i = 0; i < iv; i += LANES) {
    if (i % LINE == 0) _mm_prefetch(reinterpret_cast<const char*>(w + i) + PREFETCH_AHEAD, _MM_HINT_T0);
    const floats wv = load_floats(w + i);
    for (int r = 0; r < ROWS; ++r) acc[r] += wv * load_floats(x + r * in + i);
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum = sum_lanes(acc[r]) + bias;
    for (int64_t i = iv; i < in; ++i) sum += float(w[i]) * x[r * in + i];
    y[r * y_stride] = Y(sum);  // a bfloat16 output is rounded to nearest, ties to even
  }
}

#if defined(__AVX512BF16__)
// bfloat16 weights against bfloat16 rows (a bfloat16 model's decode step), on a CPU with AVX-512 BF16:
// one instruction (VDPBF16PS) multiplies 16 pairs of bfloat16s and adds them, in pairs, into eight
// float32 sums, where the loop above widens every weight and every input to float32 first.
template <int ROWS, typename Y>
static void row_times_rows(const at::BFloat16* w, const at::BFloat16* x, int64_t in, float bias, Y* y, int64_t y_stride) {
  const int64_t iv = in / 16 * 16;  // inputs taken 16 at a time
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < iv; i += 16) {
    if (i % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + i) + PREFETCH_AHEAD, _MM_HINT_T0);
    const __m256bh wv = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    for (int r = 0; r < ROWS; ++r)
      acc[r] = _mm256_dpbf16_ps(acc[r], wv, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * in + i)));
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum = sum_lanes((floats)acc[r]) + bias;
    for (int64_t i = iv; i < in; ++i) sum += float(w[i]) * float(x[r * in + i]);
    y[r * y_stride] = Y(sum);
  }
}
#endif

template <typename W, typename X, typename Y>
static void rows_times_weight(const X* xs, const W* ws, const float* b, Y* ys, int64_t rows, int64_t out,
                              int64_t in) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float bo = b ? b[o] : 0.f;
      for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
        const X* x0 = xs + r0 * in;
        Y* y0 = ys + r0 * out + o;
        with_rows(rows - r0, [&](auto n) { row_times_rows<decltype(n)::value>(ws + o * in, x0, in, bo, y0, out); });
      }
    }
  });
}

// y = x W^T + bias for a float32 or bfloat16 weight: x (..., in) and bias in float32 or bfloat16, y (..., out)
// in x's dtype; the sums are float32.
at::Tensor matvec(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() >= 1 && w_in.dim() == 2, "matvec: x (..., in), w (out, in)");
  TORCH_CHECK(w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16, "matvec: a float32 or bfloat16 weight");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "matvec: x float32 or bfloat16");
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();  // no copy where they are
  const int64_t out = w.size(0), in = w.size(1), rows = x.numel() / in;
  TORCH_CHECK(x.size(-1) == in, "matvec: x has ", x.size(-1), " inputs, the weight ", in);
  std::vector<float> x_copy, b_copy;
  const float* b = bias_floats(bias_in, out, b_copy, "matvec");
  at::Tensor y = at::empty(output_shape(x, out), x.options());
  const bool bf16_w = w.scalar_type() == at::kBFloat16, bf16_y = y.scalar_type() == at::kBFloat16;
#if defined(__AVX512BF16__)
  if (bf16_w && bf16_y) {  // x in bfloat16 too (y takes x's dtype): the pairs go to VDPBF16PS as they are
    rows_times_weight(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), b, y.data_ptr<at::BFloat16>(), rows, out, in);
    return y;
  }
#endif
  const float* xs = floats_of(x, x_copy);
  if (!bf16_w && !bf16_y) rows_times_weight(xs, w.data_ptr<float>(), b, y.data_ptr<float>(), rows, out, in);
  if (!bf16_w && bf16_y) rows_times_weight(xs, w.data_ptr<float>(), b, y.data_ptr<at::BFloat16>(), rows, out, in);
  if (bf16_w && !bf16_y) rows_times_weight(xs, w.data_ptr<at::BFloat16>(), b, y.data_ptr<float>(), rows, out, in);
  if (bf16_w && bf16_y) rows_times_weight(xs, w.data_ptr<at::BFloat16>(), b, y.data_ptr<at::BFloat16>(), rows, out, in);
  return y;
}

TORCH_LIBRARY_FRAGMENT(tegaki, m) { m.def("matvec(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(tegaki, CPU, m) { m.impl("matvec", &matvec); }
