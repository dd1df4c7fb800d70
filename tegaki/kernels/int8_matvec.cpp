// int8 weight times float rows: quant.py's `int8_matvec`, written as the loop it is.
//
//     y[r, o] = bias[o] + sum over groups g of  scale[o, g] * (x[r, g's inputs] . q[o, g's inputs])
//
// q is the (out, in) int8 weight, scale its (out, groups) float16 steps (a group is in / groups
// neighbouring inputs of a row: 32, llama.cpp's q8_0 block, or the whole row). Each int8 weight is read
// once, turned into a float in a register and multiplied there: the float weight is never stored,
// so a step reads a quarter of float32's bytes. The rows of x (a decode step of a batch) are all
// multiplied by a weight row while it is in the cache. The outputs are split across PyTorch's threads.
//
// LANES at a time, in GCC/Clang vector types: sixteen floats in an AVX-512 register, eight in an AVX2
// one, whichever instruction set native.py compiled this file for. One step, int8 to float, is named
// by its instruction (the compilers widen bytes poorly from vector types alone).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "tensors.h"

#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
constexpr int LANES = 16;
#elif defined(__AVX2__)
constexpr int LANES = 8;
#else
constexpr int LANES = 4;
#endif
typedef float floats __attribute__((vector_size(4 * LANES), aligned(4)));  // LANES float32s

static inline floats load_floats(const float* p) { return *reinterpret_cast<const floats*>(p); }

static inline floats load_int8s(const int8_t* p) {  // LANES int8s, each made a float32
#if defined(__AVX512F__)
  return (floats)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (floats)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  return floats{float(p[0]), float(p[1]), float(p[2]), float(p[3])};
#endif
}

static inline float sum_lanes(floats v) {
  float s = 0.f;
  for (int k = 0; k < LANES; ++k) s += v[k];
  return s;
}

// How far ahead of the loop the weight is asked for. The loop is faster than memory: without this the
// CPU's own prefetcher lets it wait on memory.
constexpr int64_t PREFETCH_AHEAD = 4096;

// One weight row o against ROWS rows of x: each LANES int8 weights are made floats once and
// multiplied into every row's sums (ROWS is a template argument, so the sums stay in registers).
template <int ROWS, typename Y>
static void row_times_rows(const int8_t* w, const at::Half* s, const float* x, int64_t in, int64_t groups,
                           float bias, Y* y, int64_t y_stride) {
  const int64_t g = in / groups;         // inputs per group
  const int64_t gv = g / LANES * LANES;  // of them, those taken LANES at a time
  floats acc[ROWS] = {};                 // per row: sum over groups of scale * (the group's products)
  float rest[ROWS] = {};                 // the same for inputs past the last multiple of LANES in a group
  for (int64_t k = 0; k < groups; ++k) {
    const int8_t* wk = w + k * g;
    if (k % 2 == 0)  // every other group of 32, one cache line: ask for the line 4 KB ahead now
      _mm_prefetch(reinterpret_cast<const char*>(wk + PREFETCH_AHEAD), _MM_HINT_T0);
    floats part[ROWS] = {};
    for (int64_t i = 0; i < gv; i += LANES) {
      const floats wv = load_int8s(wk + i);
      for (int r = 0; r < ROWS; ++r) part[r] += wv * load_floats(x + r * in + k * g + i);
    }
    const float step = float(s[k]);
    for (int r = 0; r < ROWS; ++r) acc[r] += part[r] * step;
    if (gv < g) {  // a group of a size LANES does not divide (a whole odd-sized row)
      for (int r = 0; r < ROWS; ++r) {
        float part_rest = 0.f;
        for (int64_t i = gv; i < g; ++i) part_rest += float(wk[i]) * x[r * in + k * g + i];
        rest[r] += part_rest * step;
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r * y_stride] = Y(sum_lanes(acc[r]) + rest[r] + bias);  // bf16: to nearest
}

// The int8 weight's rows, split across PyTorch's threads, against every row of x.
template <typename Y>
static void rows_times_weight(const float* xs, const int8_t* qs, const at::Half* ss, const float* b, Y* ys,
                              int64_t rows, int64_t out, int64_t in, int64_t groups) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* w = qs + o * in;     // row o of the weight
      const at::Half* s = ss + o * groups;  // its scales
      const float bo = b ? b[o] : 0.f;
      for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
        const float* x0 = xs + r0 * in;
        Y* y0 = ys + r0 * out + o;
        with_rows(rows - r0, [&](auto n) { row_times_rows<decltype(n)::value>(w, s, x0, in, groups, bo, y0, out); });
      }
    }
  });
}

// x (..., in) in float32 or bfloat16 -> y (..., out) in x's dtype; the sums are float32.
at::Tensor int8_matvec(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() >= 1 && q.dim() == 2 && scale.dim() == 2, "int8_matvec: x (..., in), q (out, in), scale (out, groups)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "int8_matvec: x float32 or bfloat16");
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kHalf, "int8_matvec: q int8, scale float16");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous(), "int8_matvec: contiguous q and scale only");
  const int64_t out = q.size(0), in = q.size(1), groups = scale.size(1);
  TORCH_CHECK(x_in.size(-1) == in && scale.size(0) == out && groups > 0 && in % groups == 0, "int8_matvec: shapes do not match");
  const at::Tensor x = x_in.contiguous();  // no copy where it is
  std::vector<float> x_copy, b_copy;
  const float* xs = floats_of(x, x_copy);
  const float* b = bias_floats(bias_in, out, b_copy, "int8_matvec");
  at::Tensor y = at::empty(output_shape(x, out), x.options());
  const int64_t rows = x.numel() / in;
  if (y.scalar_type() == at::kFloat)
    rows_times_weight(xs, q.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), b, y.data_ptr<float>(), rows, out, in, groups);
  else
    rows_times_weight(xs, q.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), b, y.data_ptr<at::BFloat16>(), rows, out, in, groups);
  return y;
}

TORCH_LIBRARY_FRAGMENT(tegaki, m) { m.def("int8_matvec(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(tegaki, CPU, m) { m.impl("int8_matvec", &int8_matvec); }
