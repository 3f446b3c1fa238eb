// The op implementations registered in csrc/registration.cpp for the CPU and CUDA keys. They
// check arguments (csrc/checks.h), allocate outputs, run the large GEMMs through ATen and
// route everything MiSS-specific to the device's kernels (csrc/kernels.h).
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include "../aten_calls.h"
#include "../checks.h"
#include "../torch_api.h"

namespace miss {

// t (a block, a fold, a gradient) in the accumulation dtype of `data` (checks.h
// accumulate_dtype), contiguous: the form the kernels and the float32 GEMMs take it in.
inline Tensor as_accumulate(const Tensor& t, const Tensor& data) {
  return aten::contiguous(aten::to(t, accumulate_dtype(data.scalar_type())));
}

// Standard and mini. The block is [r, m]: m == out is standard, m < out (m | out) is mini.
Tensor shard_fold(const Tensor& x, int64_t r, double p, const OptTensor& seed);
Tensor shard_tile_add(const Tensor& grad_x, const Tensor& g, double p,
                          const OptTensor& seed);
std::tuple<Tensor, Tensor> shard_linear(const Tensor& x, const Tensor& weight,
                                                const OptTensor& bias, const Tensor& block,
                                                double p, const OptTensor& seed);
std::tuple<Tensor, Tensor> shard_delta_add(const Tensor& y, const Tensor& x,
                                                   const Tensor& block, double p,
                                                   const OptTensor& seed);
std::tuple<Tensor, Tensor> shard_linear_backward(
    const Tensor& grad_out, const Tensor& fold, const OptTensor& weight,
    const Tensor& block, int64_t in_features, double p, const OptTensor& seed,
    const OptTensor& grad_fold, std::vector<bool> output_mask);

// BAT. The block is [out / r, r, r].
Tensor bat_weight(const Tensor& weight, const Tensor& block);
Tensor bat_block_grad(const Tensor& grad_weight, const Tensor& weight, int64_t r);
Tensor bat_weight_grad(const Tensor& grad_weight, const Tensor& block);
Tensor bat_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                      const Tensor& block);
std::tuple<Tensor, Tensor, Tensor> bat_linear_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const Tensor& block, std::vector<bool> output_mask);

// In place on weight; the variant is read from the block's rank (2-D shard, 3-D BAT).
void merge_(Tensor& weight, const Tensor& block, bool check_finite);
void unmerge_(Tensor& weight, const Tensor& block);

// Largest condition number of I + B_k that unmerge_ accepts (see unmerge_).
constexpr double kMaxUnmergeCondition = 1e4;

}  // namespace miss
