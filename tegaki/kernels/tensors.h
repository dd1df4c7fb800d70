// What tegaki's loops (matvec.cpp, int8_matvec.cpp, q8_matvec.cpp) share around the loop itself: their
// tensors before and after it, and how many rows of x they take together. native.py builds each loop
// with this file beside it, and rebuilds when it changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

// t's values as float32 (t contiguous, float32 or bfloat16): t's own memory, or `copy` filled here.
// A decode step calls this loop dozens of times on a few rows: converting them here spares each call
// the operators (and their passes through PyTorch's dispatcher) that .to(float) would run.
inline const float* floats_of(const at::Tensor& t, std::vector<float>& copy) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  const at::BFloat16* p = t.data_ptr<at::BFloat16>();
  copy.resize(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) copy[i] = float(p[i]);
  return copy.data();
}

// x's shape with its last size made `out`: the output's shape.
inline std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out;
  return shape;
}

// The bias (out,) in float32 or bfloat16 as float32 (see floats_of), or nullptr where there is none;
// `name` is the loop's, for the message.
inline const float* bias_floats(const std::optional<at::Tensor>& bias_in, int64_t out, std::vector<float>& copy,
                                const char* name) {
  if (!bias_in) return nullptr;
  const at::Tensor bias = bias_in->contiguous();
  TORCH_CHECK(bias.numel() == out && (bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kBFloat16), name,
              ": bias (out,) in float32 or bfloat16");
  return floats_of(bias, copy);
}

// Rows of x a loop takes together; more are taken MAX_ROWS at a time.
constexpr int MAX_ROWS = 8;

// f(n) with n = min(rows, MAX_ROWS) as a compile-time constant (std::integral_constant): each loop
// takes its row count as a template argument, so that its per-row sums stay in registers.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (std::min<int64_t>(rows, MAX_ROWS)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, MAX_ROWS>{}); break;
  }
}
