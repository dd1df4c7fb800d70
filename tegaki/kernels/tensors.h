// What both of tegaki's loops (matvec.cpp, int8_matvec.cpp) do with their tensors before and after
// the loop itself. native.py builds each loop with this file beside it, and rebuilds when it changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
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
