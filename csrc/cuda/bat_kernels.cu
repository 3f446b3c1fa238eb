// CUDA kernels of the BAT variant: one thread per output element, r-long dot products over
// one tile row of W or G (shared by the threads of that row, so they hit L1) and one column
// of B_k (consecutive threads read consecutive columns). Kept simple until measured on a GPU.
// Kernels that update W in place write to a temporary first: a thread's output is an input
// of the other threads of its tile row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../kernels.h"
#include "launch.cuh"

namespace miss {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void bat_transform_kernel(const scalar_t* __restrict__ weight, int64_t out, int64_t in,
                                     const acc_t* __restrict__ block, int64_t r,
                                     scalar_t* __restrict__ result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    const int64_t o = index / in, i = index % in;
    const int64_t b = i % r, tile_start = index - b;
    const acc_t* bk = block + (o / r) * r * r;
    acc_t acc = static_cast<acc_t>(weight[index]) + bk[(o % r) * r + b];
    for (int64_t c = 0; c < r; ++c) acc += static_cast<acc_t>(weight[tile_start + c]) * bk[c * r + b];
    result[index] = static_cast<scalar_t>(acc);
  }
}

// dB[k, c, b] = sum over a, j of W[k r + a, j r + c] G[k r + a, j r + b], plus
// sum over j of G[k r + c, j r + b]. G and dB in the accumulation type of W.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void bat_block_grad_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ weight,
                                      int64_t out, int64_t in, int64_t r, acc_t* __restrict__ grad_block) {
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
__global__ void bat_weight_grad_kernel(const scalar_t* __restrict__ grad, int64_t out, int64_t in,
                                       const acc_t* __restrict__ block, int64_t r,
                                       scalar_t* __restrict__ result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    const int64_t o = index / in, c = (index % in) % r, tile_start = index - c;
    const acc_t* bk_row_c = block + (o / r) * r * r + c * r;
    acc_t acc = static_cast<acc_t>(grad[index]);
    for (int64_t b = 0; b < r; ++b) acc += static_cast<acc_t>(grad[tile_start + b]) * bk_row_c[b];
    result[index] = static_cast<scalar_t>(acc);
  }
}

// W[o, j r + b] <- sum over c of (W[o, j r + c] - B_k[a, c]) inverse_k[c, b], in float64.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void bat_unmerge_kernel(const scalar_t* __restrict__ weight, int64_t out, int64_t in,
                                   const acc_t* __restrict__ block, const double* __restrict__ inverse,
                                   int64_t r, scalar_t* __restrict__ result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    const int64_t o = index / in, b = (index % in) % r, tile_start = index - b;
    const int64_t k = o / r;
    const acc_t* b_row_a = block + k * r * r + (o % r) * r;
    const double* inv_k = inverse + k * r * r;
    double acc = 0.0;
    for (int64_t c = 0; c < r; ++c) {
      const double shifted = static_cast<double>(static_cast<acc_t>(weight[tile_start + c])) - b_row_a[c];
      acc += shifted * inv_k[c * r + b];
    }
    result[index] = static_cast<scalar_t>(static_cast<acc_t>(acc));
  }
}

#define MISS_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

void bat_transform(const at::Tensor& weight, const at::Tensor& block_acc, at::Tensor& out) {
  if (weight.numel() == 0) return;
  const at::cuda::CUDAGuard guard(weight.device());
  const bool in_place = out.data_ptr() == weight.data_ptr();
  at::Tensor result = in_place ? at::empty_like(weight) : out;
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_transform_cuda", [&] {
    bat_transform_kernel<scalar_t><<<blocks_for(weight.numel()), kThreads, 0, current_stream()>>>(
        weight.const_data_ptr<scalar_t>(), weight.size(0), weight.size(1),
        block_acc.const_data_ptr<at::opmath_type<scalar_t>>(), block_acc.size(-1),
        result.data_ptr<scalar_t>());
    MISS_CUDA_CHECK_LAUNCH();
  });
  if (in_place) out.copy_(result);
}

void bat_block_grad(const at::Tensor& grad_weight, const at::Tensor& weight, at::Tensor& grad_block) {
  if (grad_block.numel() == 0) return;
  const at::cuda::CUDAGuard guard(weight.device());
  const int64_t out = weight.size(0), in = weight.size(1), r = grad_block.size(-1);
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_block_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bat_block_grad_kernel<scalar_t><<<blocks_for(out * r), kThreads, 0, current_stream()>>>(
        grad_weight.const_data_ptr<acc_t>(), weight.const_data_ptr<scalar_t>(), out, in, r,
        grad_block.data_ptr<acc_t>());
    MISS_CUDA_CHECK_LAUNCH();
  });
}

void bat_weight_grad(const at::Tensor& grad_weight, const at::Tensor& block_acc, at::Tensor& out) {
  if (grad_weight.numel() == 0) return;
  const at::cuda::CUDAGuard guard(grad_weight.device());
  MISS_DISPATCH_FLOAT(grad_weight.scalar_type(), "miss_bat_weight_grad_cuda", [&] {
    bat_weight_grad_kernel<scalar_t><<<blocks_for(grad_weight.numel()), kThreads, 0, current_stream()>>>(
        grad_weight.const_data_ptr<scalar_t>(), grad_weight.size(0), grad_weight.size(1),
        block_acc.const_data_ptr<at::opmath_type<scalar_t>>(), block_acc.size(-1),
        out.data_ptr<scalar_t>());
    MISS_CUDA_CHECK_LAUNCH();
  });
}

void bat_unmerge(at::Tensor& weight, const at::Tensor& block_acc, const at::Tensor& inverse) {
  if (weight.numel() == 0) return;
  const at::cuda::CUDAGuard guard(weight.device());
  at::Tensor result = at::empty_like(weight);
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_unmerge_cuda", [&] {
    bat_unmerge_kernel<scalar_t><<<blocks_for(weight.numel()), kThreads, 0, current_stream()>>>(
        weight.const_data_ptr<scalar_t>(), weight.size(0), weight.size(1),
        block_acc.const_data_ptr<at::opmath_type<scalar_t>>(), inverse.const_data_ptr<double>(),
        block_acc.size(-1),
        result.data_ptr<scalar_t>());
    MISS_CUDA_CHECK_LAUNCH();
  });
  weight.copy_(result);
}

}  // namespace cuda
}  // namespace miss
