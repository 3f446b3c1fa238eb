// CUDA kernels of the BAT variant and their launchers (compiled for the GPU by bat_kernels.cu
// and for the emulator by csrc/emulator/emulated_kernels.cpp): one thread per output element,
// r-long dot products over one tile row of W or G (shared by the threads of that row, so
// they hit L1) and one column of B_k (consecutive threads read consecutive columns). Kept
// simple until measured on a GPU. Kernels that update W in place write to a temporary
// first: a thread's output is an input of the other threads of its tile row.
#pragma once

#include "../kernels.h"
#include "device_api.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

using device::gptr;
using device::kThreads;

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
MISS_GLOBAL void bat_transform_kernel(gptr<const scalar_t> MISS_RESTRICT weight, int64_t out, int64_t in,
                                      gptr<const acc_t> MISS_RESTRICT block, int64_t r,
                                      gptr<scalar_t> MISS_RESTRICT result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    const int64_t o = index / in, i = index % in;
    const int64_t b = i % r, tile_start = index - b;
    const gptr<const acc_t> bk = block + (o / r) * r * r;
    acc_t acc = static_cast<acc_t>(weight[index]) + bk[(o % r) * r + b];
    for (int64_t c = 0; c < r; ++c) acc += static_cast<acc_t>(weight[tile_start + c]) * bk[c * r + b];
    result[index] = static_cast<scalar_t>(acc);
  }
}

// dB[k, c, b] = sum over a, j of W[k r + a, j r + c] G[k r + a, j r + b], plus
// sum over j of G[k r + c, j r + b]. G and dB in the accumulation type of W.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
MISS_GLOBAL void bat_block_grad_kernel(gptr<const acc_t> MISS_RESTRICT grad, gptr<const scalar_t> MISS_RESTRICT weight,
                                       int64_t out, int64_t in, int64_t r, gptr<acc_t> MISS_RESTRICT grad_block) {
  MISS_GRID_STRIDE_LOOP(index, out * r) {
    const int64_t k = index / (r * r), c = (index / r) % r, b = index % r;
    acc_t acc = 0;
    for (int64_t a = 0; a < r; ++a) {
      const int64_t row = (k * r + a) * in;
      for (int64_t j = 0; j * r < in; ++j) {
        acc += static_cast<acc_t>(weight[row + j * r + c]) * grad[row + j * r + b];
      }
    }
    const int64_t row_c = (k * r + c) * in;
    for (int64_t j = 0; j * r < in; ++j) acc += grad[row_c + j * r + b];
    grad_block[index] = acc;
  }
}

// dW[o, j r + c] = G[o, j r + c] + sum over b of G[o, j r + b] B_k[c, b].
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
MISS_GLOBAL void bat_weight_grad_kernel(gptr<const scalar_t> MISS_RESTRICT grad, int64_t out, int64_t in,
                                        gptr<const acc_t> MISS_RESTRICT block, int64_t r,
                                        gptr<scalar_t> MISS_RESTRICT result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    const int64_t o = index / in, c = (index % in) % r, tile_start = index - c;
    const gptr<const acc_t> bk_row_c = block + (o / r) * r * r + c * r;
    acc_t acc = static_cast<acc_t>(grad[index]);
    for (int64_t b = 0; b < r; ++b) acc += static_cast<acc_t>(grad[tile_start + b]) * bk_row_c[b];
    result[index] = static_cast<scalar_t>(acc);
  }
}

// W[o, j r + b] <- sum over c of (W[o, j r + c] - B_k[a, c]) inverse_k[c, b], in float64.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
MISS_GLOBAL void bat_unmerge_kernel(gptr<const scalar_t> MISS_RESTRICT weight, int64_t out, int64_t in,
                                    gptr<const acc_t> MISS_RESTRICT block, gptr<const double> MISS_RESTRICT inverse,
                                    int64_t r, gptr<scalar_t> MISS_RESTRICT result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    const int64_t o = index / in, b = (index % in) % r, tile_start = index - b;
    const int64_t k = o / r;
    const gptr<const acc_t> b_row_a = block + k * r * r + (o % r) * r;
    const gptr<const double> inv_k = inverse + k * r * r;
    double acc = 0.0;
    for (int64_t c = 0; c < r; ++c) {
      const double shifted = static_cast<double>(static_cast<acc_t>(weight[tile_start + c])) - b_row_a[c];
      acc += shifted * inv_k[c * r + b];
    }
    result[index] = static_cast<scalar_t>(static_cast<acc_t>(acc));
  }
}

}  // namespace

void bat_transform(const at::Tensor& weight, const at::Tensor& block_acc, at::Tensor& out) {
  if (weight.numel() == 0) return;
  MISS_DEVICE_GUARD(weight);
  const bool in_place = out.data_ptr() == weight.data_ptr();
  at::Tensor result = in_place ? at::empty_like(weight) : out;
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_transform_cuda", [&] {
    const auto w = device::input<scalar_t>(weight, "weight");
    const auto b = device::input<at::opmath_type<scalar_t>>(block_acc, "block");
    const auto res = device::output<scalar_t>(result, "result");
    MISS_LAUNCH(bat_transform_kernel<scalar_t>, device::blocks_for(weight.numel()), kThreads, w, weight.size(0),
                weight.size(1), b, block_acc.size(-1), res);
  });
  if (in_place) out.copy_(result);
}

void bat_block_grad(const at::Tensor& grad_weight, const at::Tensor& weight, at::Tensor& grad_block) {
  if (grad_block.numel() == 0) return;
  MISS_DEVICE_GUARD(weight);
  const int64_t out = weight.size(0), in = weight.size(1), r = grad_block.size(-1);
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_block_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto g = device::input<acc_t>(grad_weight, "grad_weight");
    const auto w = device::input<scalar_t>(weight, "weight");
    const auto db = device::output<acc_t>(grad_block, "grad_block");
    MISS_LAUNCH(bat_block_grad_kernel<scalar_t>, device::blocks_for(out * r), kThreads, g, w, out, in, r, db);
  });
}

void bat_weight_grad(const at::Tensor& grad_weight, const at::Tensor& block_acc, at::Tensor& out) {
  if (grad_weight.numel() == 0) return;
  MISS_DEVICE_GUARD(grad_weight);
  MISS_DISPATCH_FLOAT(grad_weight.scalar_type(), "miss_bat_weight_grad_cuda", [&] {
    const auto g = device::input<scalar_t>(grad_weight, "grad_weight");
    const auto b = device::input<at::opmath_type<scalar_t>>(block_acc, "block");
    const auto res = device::output<scalar_t>(out, "out");
    MISS_LAUNCH(bat_weight_grad_kernel<scalar_t>, device::blocks_for(grad_weight.numel()), kThreads, g,
                grad_weight.size(0), grad_weight.size(1), b, block_acc.size(-1), res);
  });
}

void bat_unmerge(at::Tensor& weight, const at::Tensor& block_acc, const at::Tensor& inverse) {
  if (weight.numel() == 0) return;
  MISS_DEVICE_GUARD(weight);
  at::Tensor result = at::empty_like(weight);
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_unmerge_cuda", [&] {
    const auto w = device::input<scalar_t>(weight, "weight");
    const auto b = device::input<at::opmath_type<scalar_t>>(block_acc, "block");
    const auto inv = device::input<double>(inverse, "inverse");
    const auto res = device::output<scalar_t>(result, "result");
    MISS_LAUNCH(bat_unmerge_kernel<scalar_t>, device::blocks_for(weight.numel()), kThreads, w, weight.size(0),
                weight.size(1), b, inv, block_acc.size(-1), res);
  });
  weight.copy_(result);
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
