// CUDA kernels of the standard and mini variants. The index math (shards, rows of a strided
// x) and the dropout mask come from the headers the CPU kernels use, so the CPU tests cover
// them and both devices draw the same mask for the same seed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../kernels.h"
#include "../shard_index.h"
#include "../tensor_views.h"
#include "launch.cuh"

namespace miss {
namespace cuda {
namespace {

// One block per row (grid-stride over rows). With r < blockDim the threads form
// blockDim / r groups of r lanes: lane c of group g sums shards g, g + groups, ... at
// position c (consecutive lanes read consecutive columns), then the groups are summed in
// shared memory. With r >= blockDim one group loops over the positions.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void shard_fold_kernel(const scalar_t* __restrict__ x, RowIndexer indexer, int64_t rows,
                                  int64_t in, int64_t r, DropoutParams dropout,
                                  acc_t* __restrict__ fold) {
  __shared__ acc_t partial[kThreads];
  const int64_t lanes = r < blockDim.x ? r : blockDim.x;
  const int64_t groups = blockDim.x / lanes;
  const int64_t lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int64_t shards = ceil_div(in, r);
  const int64_t cs = indexer.column_stride;
  const int64_t seed = dropout.enabled ? dropout.seed() : 0;
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const scalar_t* row = x + indexer.row_offset(n);
    for (int64_t first = 0; first < r; first += lanes) {
      const int64_t c = first + lane;
      acc_t acc = 0;
      if (group < groups && c < r) {
        for (int64_t s = group; s < shards; s += groups) {
          const int64_t i = s * r + c;
          if (i < in) acc += static_cast<acc_t>(row[i * cs]) * dropout_multiplier<acc_t>(dropout, seed, n, i);
        }
      }
      if (groups == 1) {
        if (c < r) fold[n * r + c] = acc;
      } else {
        partial[threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.x < lanes) {
          acc_t sum = 0;
          for (int64_t g = 0; g < groups; ++g) sum += partial[g * lanes + threadIdx.x];
          fold[n * r + threadIdx.x] = sum;
        }
        __syncthreads();
      }
    }
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void shard_tile_kernel(scalar_t* __restrict__ grad_x, int64_t rows, int64_t in,
                                  const acc_t* __restrict__ g, int64_t r, DropoutParams dropout,
                                  bool accumulate) {
  const int64_t seed = dropout.enabled ? dropout.seed() : 0;
  MISS_GRID_STRIDE_LOOP(index, rows * in) {
    const int64_t n = index / in, i = index % in;
    const acc_t value = g[n * r + i % r] * dropout_multiplier<acc_t>(dropout, seed, n, i);
    grad_x[index] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(grad_x[index]) + value : value);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void add_out_tiled_kernel(scalar_t* __restrict__ y, int64_t rows, int64_t out,
                                     const acc_t* __restrict__ v, int64_t m) {
  MISS_GRID_STRIDE_LOOP(index, rows * out) {
    const int64_t n = index / out, o = index % out;
    y[index] = static_cast<scalar_t>(static_cast<acc_t>(y[index]) + v[n * m + o % m]);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t merged_value(const scalar_t* weight, int64_t index, int64_t in,
                                                 const acc_t* block, int64_t r, int64_t m, float sign) {
  const int64_t o = index / in, i = index % in;
  return static_cast<scalar_t>(static_cast<acc_t>(weight[index]) + sign * block[(i % r) * m + o % m]);
}

// result may be weight itself: each element reads only its own input.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void shard_merge_kernel(const scalar_t* weight, int64_t out, int64_t in,
                                   const acc_t* __restrict__ block, int64_t r, int64_t m, float sign,
                                   scalar_t* result) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    result[index] = merged_value(weight, index, in, block, r, m, sign);
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void shard_merge_finite_kernel(const scalar_t* __restrict__ weight, int64_t out, int64_t in,
                                          const acc_t* __restrict__ block, int64_t r, int64_t m,
                                          float sign, int* __restrict__ all_finite) {
  MISS_GRID_STRIDE_LOOP(index, out * in) {
    if (!isfinite(static_cast<double>(merged_value(weight, index, in, block, r, m, sign)))) {
      *all_finite = 0;
    }
  }
}

#define MISS_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

void shard_fold(const at::Tensor& x, const DropoutParams& dropout, at::Tensor& fold) {
  const int64_t rows = fold.size(0), r = fold.size(1), in = x.size(-1);
  if (rows == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const RowIndexer indexer = make_row_indexer(x);
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(rows, 65535 * 16));
  MISS_DISPATCH_FLOAT(x.scalar_type(), "miss_shard_fold_cuda", [&] {
    shard_fold_kernel<scalar_t><<<grid, kThreads, 0, current_stream()>>>(
        x.const_data_ptr<scalar_t>(), indexer, rows, in, r, dropout,
        fold.data_ptr<at::opmath_type<scalar_t>>());
    MISS_CUDA_CHECK_LAUNCH();
  });
}

void shard_tile(at::Tensor& grad_x, const at::Tensor& g, const DropoutParams& dropout,
                bool accumulate) {
  const int64_t rows = grad_x.size(0), in = grad_x.size(1), r = g.size(1);
  if (grad_x.numel() == 0) return;
  const at::cuda::CUDAGuard guard(grad_x.device());
  MISS_DISPATCH_FLOAT(grad_x.scalar_type(), "miss_shard_tile_cuda", [&] {
    shard_tile_kernel<scalar_t><<<blocks_for(rows * in), kThreads, 0, current_stream()>>>(
        grad_x.data_ptr<scalar_t>(), rows, in, g.const_data_ptr<at::opmath_type<scalar_t>>(), r,
        dropout, accumulate);
    MISS_CUDA_CHECK_LAUNCH();
  });
}

void add_out_tiled(at::Tensor& y, const at::Tensor& v) {
  const int64_t rows = y.size(0), out = y.size(1), m = v.size(1);
  if (y.numel() == 0) return;
  const at::cuda::CUDAGuard guard(y.device());
  MISS_DISPATCH_FLOAT(y.scalar_type(), "miss_add_out_tiled_cuda", [&] {
    add_out_tiled_kernel<scalar_t><<<blocks_for(rows * out), kThreads, 0, current_stream()>>>(
        y.data_ptr<scalar_t>(), rows, out, v.const_data_ptr<at::opmath_type<scalar_t>>(), m);
    MISS_CUDA_CHECK_LAUNCH();
  });
}

void shard_merge(const at::Tensor& weight, const at::Tensor& block_acc, float sign, at::Tensor& result) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return;
  const at::cuda::CUDAGuard guard(weight.device());
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_cuda", [&] {
    shard_merge_kernel<scalar_t><<<blocks_for(out * in), kThreads, 0, current_stream()>>>(
        weight.const_data_ptr<scalar_t>(), out, in, block_acc.const_data_ptr<at::opmath_type<scalar_t>>(),
        block_acc.size(0), block_acc.size(1), sign, result.data_ptr<scalar_t>());
    MISS_CUDA_CHECK_LAUNCH();
  });
}

bool shard_merge_is_finite(const at::Tensor& weight, const at::Tensor& block_acc, float sign) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return true;
  const at::cuda::CUDAGuard guard(weight.device());
  at::Tensor all_finite = at::ones({1}, weight.options().dtype(at::kInt));
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_finite_cuda", [&] {
    shard_merge_finite_kernel<scalar_t><<<blocks_for(out * in), kThreads, 0, current_stream()>>>(
        weight.const_data_ptr<scalar_t>(), out, in, block_acc.const_data_ptr<at::opmath_type<scalar_t>>(),
        block_acc.size(0), block_acc.size(1), sign, all_finite.data_ptr<int>());
    MISS_CUDA_CHECK_LAUNCH();
  });
  return all_finite.item<int>() == 1;
}

}  // namespace cuda
}  // namespace miss
