// The op implementations registered in csrc/registration.cpp for the CPU and CUDA keys. They
// check arguments (csrc/checks.h), allocate outputs, run the large GEMMs through ATen and
// route everything MiSS-specific to the device's kernels (csrc/kernels.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace miss {

using OptTensor = std::optional<at::Tensor>;

// Standard and mini. The block is [r, m]: m == out is standard, m < out (m | out) is mini.
at::Tensor shard_fold(const at::Tensor& x, int64_t r, double p, const OptTensor& seed);
at::Tensor shard_tile_add(const at::Tensor& grad_x, const at::Tensor& g, double p,
                          const OptTensor& seed);
std::tuple<at::Tensor, at::Tensor> shard_linear(const at::Tensor& x, const at::Tensor& weight,
                                                const OptTensor& bias, const at::Tensor& block,
                                                double p, const OptTensor& seed);
std::tuple<at::Tensor, at::Tensor> shard_delta_add(const at::Tensor& y, const at::Tensor& x,
                                                   const at::Tensor& block, double p,
                                                   const OptTensor& seed);
std::tuple<at::Tensor, at::Tensor> shard_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& fold, const OptTensor& weight,
    const at::Tensor& block, int64_t in_features, double p, const OptTensor& seed,
    const OptTensor& grad_fold, std::array<bool, 2> output_mask);

// BAT. The block is [out / r, r, r].
at::Tensor bat_weight(const at::Tensor& weight, const at::Tensor& block);
at::Tensor bat_block_grad(const at::Tensor& grad_weight, const at::Tensor& weight, int64_t r);
at::Tensor bat_weight_grad(const at::Tensor& grad_weight, const at::Tensor& block);
at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& block);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bat_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& block, std::array<bool, 3> output_mask);

// In place on weight; the variant is read from the block's rank (2-D shard, 3-D BAT).
void merge_(at::Tensor& weight, const at::Tensor& block, bool check_finite);
void unmerge_(at::Tensor& weight, const at::Tensor& block);

// Largest condition number of I + B_k that unmerge_ accepts (see unmerge_).
constexpr double kMaxUnmergeCondition = 1e4;

}  // namespace miss
