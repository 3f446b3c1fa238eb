// CUDA kernels of the standard and mini variants. The index math (shards, rows of a strided
// x) and the dropout mask come from the headers the CPU kernels use, so the CPU tests cover
// them and both devices draw the same mask for the same seed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>

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

// --- Elementwise updates of a contiguous [rows, width] array ---------------------------
// One kernel serves the tile-add into grad_x, the out-tiled add into y and the merge into W:
// each thread updates kVec consecutive elements with one 16-byte load and store when both
// arrays are 16-byte aligned (checked on the host), else one element at a time. `Update` maps
// (flat index, old value) to the new value; src may be dst.

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <int kVec, typename scalar_t, typename Update>
__global__ void update_rows_kernel(const scalar_t* src, scalar_t* dst, int64_t total, Update update) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x * kVec;
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; first < total;
       first += step) {
    if (first + kVec <= total) {
      Pack<scalar_t, kVec> pack = *reinterpret_cast<const Pack<scalar_t, kVec>*>(src + first);
#pragma unroll
      for (int k = 0; k < kVec; ++k) pack.v[k] = update(first + k, pack.v[k]);
      *reinterpret_cast<Pack<scalar_t, kVec>*>(dst + first) = pack;
    } else {
      for (int64_t index = first; index < total; ++index) dst[index] = update(index, src[index]);
    }
  }
}

template <typename scalar_t, typename Update>
void launch_update_rows(const scalar_t* src, scalar_t* dst, int64_t total, const Update& update) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (aligned) {
    update_rows_kernel<kVec><<<blocks_for(ceil_div(total, kVec)), kThreads, 0, current_stream()>>>(
        src, dst, total, update);
  } else {
    update_rows_kernel<1><<<blocks_for(total), kThreads, 0, current_stream()>>>(src, dst, total, update);
  }
  MISS_CUDA_CHECK_LAUNCH();
}

// grad_x[n, i] (+)= drop(n, i) * g[n, i % r]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct TileUpdate {
  const acc_t* g;
  int64_t in, r;
  DropoutParams dropout;
  bool accumulate;
  __device__ scalar_t operator()(int64_t index, scalar_t old) const {
    const int64_t n = index / in, i = index % in;
    const int64_t seed = dropout.enabled ? dropout.seed() : 0;
    const acc_t value = g[n * r + i % r] * dropout_multiplier<acc_t>(dropout, seed, n, i);
    return static_cast<scalar_t>(accumulate ? static_cast<acc_t>(old) + value : value);
  }
};

// y[n, o] += v[n, o % m]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct OutTiledAdd {
  const acc_t* v;
  int64_t out, m;
  __device__ scalar_t operator()(int64_t index, scalar_t old) const {
    const int64_t n = index / out, o = index % out;
    return static_cast<scalar_t>(static_cast<acc_t>(old) + v[n * m + o % m]);
  }
};

// W[o, i] + sign * B[i % r, o % m]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct MergeUpdate {
  const acc_t* block;
  int64_t in, r, m;
  float sign;
  __device__ scalar_t operator()(int64_t index, scalar_t old) const {
    const int64_t o = index / in, i = index % in;
    return static_cast<scalar_t>(static_cast<acc_t>(old) + sign * block[(i % r) * m + o % m]);
  }
};

template <typename scalar_t>
__global__ void shard_merge_finite_kernel(const scalar_t* __restrict__ weight, int64_t total,
                                          MergeUpdate<scalar_t> merged, int* __restrict__ all_finite) {
  MISS_GRID_STRIDE_LOOP(index, total) {
    if (!isfinite(static_cast<double>(merged(index, weight[index])))) *all_finite = 0;
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
    scalar_t* data = grad_x.data_ptr<scalar_t>();
    const TileUpdate<scalar_t> update{g.const_data_ptr<at::opmath_type<scalar_t>>(), in, r, dropout, accumulate};
    launch_update_rows(data, data, rows * in, update);
  });
}

void add_out_tiled(at::Tensor& y, const at::Tensor& v) {
  const int64_t rows = y.size(0), out = y.size(1), m = v.size(1);
  if (y.numel() == 0) return;
  const at::cuda::CUDAGuard guard(y.device());
  MISS_DISPATCH_FLOAT(y.scalar_type(), "miss_add_out_tiled_cuda", [&] {
    scalar_t* data = y.data_ptr<scalar_t>();
    launch_update_rows(data, data, rows * out, OutTiledAdd<scalar_t>{v.const_data_ptr<at::opmath_type<scalar_t>>(), out, m});
  });
}

void shard_merge(const at::Tensor& weight, const at::Tensor& block_acc, float sign, at::Tensor& result) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return;
  const at::cuda::CUDAGuard guard(weight.device());
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_cuda", [&] {
    const MergeUpdate<scalar_t> update{block_acc.const_data_ptr<at::opmath_type<scalar_t>>(), in,
                                       block_acc.size(0), block_acc.size(1), sign};
    launch_update_rows(weight.const_data_ptr<scalar_t>(), result.data_ptr<scalar_t>(), out * in, update);
  });
}

bool shard_merge_is_finite(const at::Tensor& weight, const at::Tensor& block_acc, float sign) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return true;
  const at::cuda::CUDAGuard guard(weight.device());
  at::Tensor all_finite = at::ones({1}, weight.options().dtype(at::kInt));
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_finite_cuda", [&] {
    const MergeUpdate<scalar_t> merged{block_acc.const_data_ptr<at::opmath_type<scalar_t>>(), in,
                                       block_acc.size(0), block_acc.size(1), sign};
    shard_merge_finite_kernel<scalar_t><<<blocks_for(out * in), kThreads, 0, current_stream()>>>(
        weight.const_data_ptr<scalar_t>(), out * in, merged, all_finite.data_ptr<int>());
    MISS_CUDA_CHECK_LAUNCH();
  });
  return all_finite.item<int>() == 1;
}

}  // namespace cuda
}  // namespace miss
