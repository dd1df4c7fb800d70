// int8 weights times int8 activations: quant.py's `q8_matvec`, written as the loop it is.
//
//     qx[r, g], sx[r, g] = x[r, g's 32 inputs] quantized like a weight group (max |x| -> 127)
//     y[r, o] = bias[o] + sum over groups g of  scale[o, g] * sx[r, g] * (qx[r, g] . q[o, g])
//
// The dot product of a group is a sum of 32 int8 x int8 products, exact in int32: the CPU's integer dot
// product instructions take four bytes of each at a time (AVX-512 VNNI's vpdpbusd, or AVX2's
// vpmaddubsw + vpmaddwd), so a step multiplies 64 weights where the float loop (int8_matvec.cpp)
// multiplies 16. This is llama.cpp's q8_0 x q8_0 dot product.
//
// The weight is read in quant.py's `pack_q8` order: tiles of 16 output rows, and in a tile, for each
// group, eight pieces of 64 bytes (4 inputs of each of the 16 rows). One piece against 4 bytes of x
// (the same 4 bytes in every lane) gives the 16 rows' partial sums in the 16 lanes of one register, so
// no sum across lanes is ever needed; the tile's 16 scales of a group are one load beside it.
//
// vpdpbusd multiplies unsigned bytes by signed ones. The activations are made unsigned by adding 128:
// (qx + 128) . q = qx . q + 128 * sum(q), so each group's sums start from -128 * sum(q), a row's
// sum(q) taken by one more vpdpbusd of the piece with bytes of 1 (once for all rows of x). AVX2's
// vpmaddubsw (no VNNI) would saturate 16-bit pairs of such products, so there the activations stay
// signed and take llama.cpp's sign trick: |qx| . (q * sign(qx)), every product at most 127 * 127.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "tensors.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

constexpr int TILE = 16;   // output rows a tile interleaves
constexpr int GROUP = 32;  // inputs per scale (of the weight and of x)
constexpr int PIECES = GROUP / 4;

// x's rows quantized by groups of 32, as quant.py's `quantize_rows_q8`: d = max|x| / 127,
// q = round(x / d) to nearest, ties to even (the CPU's rounding mode), computed as x * (1 / d).
// The int8 codes are kept as 32-bit words of four (what a piece is multiplied by), plus 128 each for
// vpdpbusd (`unsigned_codes`).
static void quantize_rows(const float* x, int64_t rows, int64_t in, bool unsigned_codes, uint32_t* codes, float* steps) {
  const int64_t groups = in / GROUP;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + r * in + g * GROUP;
      float amax = 0.f;
      for (int i = 0; i < GROUP; ++i) amax = std::max(amax, std::fabs(xg[i]));
      const float d = amax / 127.f;
      const float inverse = d != 0.f ? 1.f / d : 0.f;
      int8_t q[GROUP];
      for (int i = 0; i < GROUP; ++i) q[i] = int8_t(std::nearbyint(xg[i] * inverse));
      if (unsigned_codes)
        for (int i = 0; i < GROUP; ++i) q[i] = int8_t(uint8_t(q[i]) ^ 0x80);  // + 128, as a byte
      std::memcpy(codes + (r * groups + g) * PIECES, q, GROUP);
      steps[r * groups + g] = d;
    }
  }
}

// One tile (16 output rows) against ROWS rows of x: out[r][lane] = y[r, tile's row lane] before bias.
template <int ROWS>
static void tile_times_rows(const int8_t* w, const at::Half* ws, const uint32_t* codes,
                            const float* steps, int64_t groups, float (*out)[TILE]) {
#if defined(__AVX512VNNI__)
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * GROUP * TILE;  // this group's 8 pieces of 64 bytes
    __m512i piece[PIECES];
    for (int j = 0; j < PIECES; ++j) piece[j] = _mm512_loadu_si512(wg + j * 64);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + g * TILE)));
    __m512i sum = _mm512_setzero_si512();  // sum(q) of each of the 16 rows
    for (int j = 0; j < PIECES; ++j) sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), piece[j]);
    const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7));  // -128 * sum(q)
    for (int r = 0; r < ROWS; ++r) {
      const uint32_t* c = codes + (r * groups + g) * PIECES;
      __m512i dot = start;
      for (int j = 0; j < PIECES; ++j) dot = _mm512_dpbusd_epi32(dot, _mm512_set1_epi32(int(c[j])), piece[j]);
      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(steps[r * groups + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), step, acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(out[r], acc[r]);
#elif defined(__AVX2__)
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * GROUP * TILE;
    for (int r = 0; r < ROWS; ++r) {
      const uint32_t* c = codes + (r * groups + g) * PIECES;
      __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int j = 0; j < PIECES; ++j) {
        const __m256i xq = _mm256_set1_epi32(int(c[j]));
        const __m256i xabs = _mm256_sign_epi8(xq, xq);  // |qx|, a byte each
        for (int h = 0; h < 2; ++h) {  // the tile's rows 0-7, then 8-15
          const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * 64 + h * 32));
          const __m256i pairs = _mm256_maddubs_epi16(xabs, _mm256_sign_epi8(wq, xq));  // |qx| * q * sign(qx)
          dot[h] = _mm256_add_epi32(dot[h], _mm256_madd_epi16(pairs, ones));
        }
      }
      const __m256 step = _mm256_set1_ps(steps[r * groups + g]);
      for (int h = 0; h < 2; ++h) {
        const __m256 halves = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + g * TILE + h * 8)));
        const __m256 scale = _mm256_mul_ps(halves, step);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), scale, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm256_storeu_ps(out[r], acc[r][0]);
    _mm256_storeu_ps(out[r] + 8, acc[r][1]);
  }
#else
  for (int r = 0; r < ROWS; ++r) {
    float acc[TILE] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* xq = reinterpret_cast<const int8_t*>(codes + (r * groups + g) * PIECES);
      for (int lane = 0; lane < TILE; ++lane) {
        int32_t dot = 0;
        for (int j = 0; j < PIECES; ++j)
          for (int b = 0; b < 4; ++b) dot += int32_t(xq[j * 4 + b]) * w[g * GROUP * TILE + j * 64 + lane * 4 + b];
        acc[lane] += float(dot) * (float(ws[g * TILE + lane]) * steps[r * groups + g]);
      }
    }
    for (int lane = 0; lane < TILE; ++lane) out[r][lane] = acc[lane];
  }
#endif
}

template <typename Y>
static void rows_times_tiles(const uint32_t* codes, const float* steps, const int8_t* w, const at::Half* ws,
                             const float* b, Y* ys, int64_t rows, int64_t out, int64_t groups) {
  const int64_t tiles = (out + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    float sums[MAX_ROWS][TILE];
    for (int64_t t = begin; t < end; ++t) {
      const int8_t* wt = w + t * groups * GROUP * TILE;
      const at::Half* st = ws + t * groups * TILE;
      const int64_t lanes = std::min<int64_t>(TILE, out - t * TILE);  // the last tile may be padding in part
      for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
        const uint32_t* c = codes + r0 * groups * PIECES;
        const float* s = steps + r0 * groups;
        const int n = int(std::min<int64_t>(rows - r0, MAX_ROWS));
        with_rows(n, [&](auto m) { tile_times_rows<decltype(m)::value>(wt, st, c, s, groups, sums); });
        for (int r = 0; r < n; ++r)
          for (int64_t lane = 0; lane < lanes; ++lane) {
            const int64_t o = t * TILE + lane;
            ys[(r0 + r) * out + o] = Y(sums[r][lane] + (b ? b[o] : 0.f));  // bf16: to nearest
          }
      }
    }
  });
}

// x (..., in) float32 or bfloat16; the weight as pack_q8 made it: tiles (tiles, groups, 8, 16, 4) int8,
// tile_scale (tiles, groups, 16) float16; bias (out,) or None -> y (..., out) in
// x's dtype.
at::Tensor q8_matvec(const at::Tensor& x_in, const at::Tensor& tiles, const at::Tensor& tile_scale,
                     const std::optional<at::Tensor>& bias_in, int64_t out) {
  TORCH_CHECK(x_in.dim() >= 1 && tiles.dim() == 5 && tile_scale.dim() == 3,
              "q8_matvec: x (..., in), tiles (tiles, groups, 8, 16, 4), tile_scale (tiles, groups, 16)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "q8_matvec: x float32 or bfloat16");
  TORCH_CHECK(tiles.scalar_type() == at::kChar && tile_scale.scalar_type() == at::kHalf, "q8_matvec: tiles int8, tile_scale float16");
  TORCH_CHECK(tiles.is_contiguous() && tile_scale.is_contiguous(), "q8_matvec: contiguous weights only");
  const int64_t n_tiles = tiles.size(0), groups = tiles.size(1), in = groups * GROUP;
  TORCH_CHECK(tiles.size(2) == PIECES && tiles.size(3) == TILE && tiles.size(4) == 4, "q8_matvec: tiles (tiles, groups, 8, 16, 4)");
  TORCH_CHECK(tile_scale.size(0) == n_tiles && tile_scale.size(1) == groups && tile_scale.size(2) == TILE,
              "q8_matvec: tile_scale (tiles, groups, 16)");
  TORCH_CHECK(x_in.size(-1) == in && out > (n_tiles - 1) * TILE && out <= n_tiles * TILE, "q8_matvec: shapes do not match");
  const at::Tensor x = x_in.contiguous();
  std::vector<float> x_copy, b_copy;
  const float* xs = floats_of(x, x_copy);
  const float* b = bias_floats(bias_in, out, b_copy, "q8_matvec");
  const int64_t rows = x.numel() / in;
#if defined(__AVX512VNNI__)
  constexpr bool unsigned_codes = true;
#else
  constexpr bool unsigned_codes = false;
#endif
  std::vector<uint32_t> codes(rows * groups * PIECES);
  std::vector<float> steps(rows * groups);
  quantize_rows(xs, rows, in, unsigned_codes, codes.data(), steps.data());
  at::Tensor y = at::empty(output_shape(x, out), x.options());
  const int8_t* w = tiles.data_ptr<int8_t>();
  if (y.scalar_type() == at::kFloat)
    rows_times_tiles(codes.data(), steps.data(), w, tile_scale.data_ptr<at::Half>(), b,
                     y.data_ptr<float>(), rows, out, groups);
  else
    rows_times_tiles(codes.data(), steps.data(), w, tile_scale.data_ptr<at::Half>(), b,
                     y.data_ptr<at::BFloat16>(), rows, out, groups);
  return y;
}

TORCH_LIBRARY_FRAGMENT(tegaki, m) {
  m.def("q8_matvec(Tensor x, Tensor tiles, Tensor tile_scale, Tensor? bias, int out) -> Tensor");
}
TORCH_LIBRARY_IMPL(tegaki, CPU, m) { m.impl("q8_matvec", &q8_matvec); }
