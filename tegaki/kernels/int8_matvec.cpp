// int8 weight times float rows: quant.py's `int8_matvec`, written as the loop it is.
//
//     y[r, o] = bias[o] + sum over groups g of  scale[o, g] * (x[r, g's inputs] . q[o, g's inputs])
//
// q is the (out, in) int8 weight, scale its (out, groups) float32 steps (a group is in / groups
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
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

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

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 2, "int8_matvec: x (N, in), q (out, in), scale (out, groups)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_matvec: x and scale float32, q int8");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous(), "int8_matvec: contiguous tensors only");
  const int64_t rows = x.size(0), out = q.size(0), in = q.size(1), groups = scale.size(1);
  TORCH_CHECK(x.size(1) == in && scale.size(0) == out && groups > 0 && in % groups == 0, "int8_matvec: shapes do not match");
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out, "int8_matvec: bias (out,) float32");
    b = bias->data_ptr<float>();
  }
  const int64_t g = in / groups;   // inputs per group
  const int64_t gv = g / LANES * LANES;  // of them, those LANES at a time take
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xs = x.data_ptr<float>();
  const int8_t* qs = q.data_ptr<int8_t>();
  const float* ss = scale.data_ptr<float>();
  float* ys = y.data_ptr<float>();

  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int8_t* w = qs + o * in;     // row o of the weight
      const float* s = ss + o * groups;  // its scales
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xs + r * in;
        floats acc = {};  // sum over groups of scale * (the group's products, LANES wide)
        float rest = 0.f;   // the same for inputs past the last multiple of LANES in a group
        for (int64_t k = 0; k < groups; ++k) {
          const int8_t* wk = w + k * g;
          const float* xk = xr + k * g;
          floats part = {};
          for (int64_t i = 0; i < gv; i += LANES) part += load_int8s(wk + i) * load_floats(xk + i);
          acc += part * s[k];
          if (gv < g) {  // a group of a size LANES does not divide (a whole odd-sized row)
            float part_rest = 0.f;
            for (int64_t i = gv; i < g; ++i) part_rest += float(wk[i]) * xk[i];
            rest += part_rest * s[k];
          }
        }
        ys[r * out + o] = sum_lanes(acc) + rest + (b ? b[o] : 0.f);
      }
    }
  });
  return y;
}

TORCH_LIBRARY(tegaki, m) { m.def("int8_matvec(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(tegaki, CPU, m) { m.impl("int8_matvec", &int8_matvec); }
