// CUDA kernels of the standard and mini variants, and their launchers: compiled by nvcc for
// the GPU (shard_kernels.cu) and by the host compiler for the emulator
// (csrc/emulator/emulated_kernels.cpp), through device_api.cuh. The index math (shards, rows
// of a strided x) and the dropout mask come from the headers the CPU kernels use, so the CPU
// tests cover them and both devices draw the same mask for the same seed.
#pragma once

#include <cstdint>

#include "../kernels.h"
#include "../shard_index.h"
#include "../tensor_views.h"
#include "device_api.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

using device::gptr;
using device::kThreads;

// One block per row (grid-stride over rows). With r < blockDim the threads form
// blockDim / r groups of r lanes: lane c of group g sums shards g, g + groups, ... at
// position c (consecutive lanes read consecutive columns), then the groups are summed in
// shared memory. With r >= blockDim one group loops over the positions.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
MISS_GLOBAL void shard_fold_kernel(gptr<const scalar_t> MISS_RESTRICT x, RowIndexer indexer, int64_t rows,
                                   int64_t in, int64_t r, DropoutParams dropout,
                                   gptr<acc_t> MISS_RESTRICT fold) {
  MISS_SHARED_ARRAY(acc_t, partial, kThreads);
  const int64_t lanes = r < blockDim.x ? r : blockDim.x;
  const int64_t groups = blockDim.x / lanes;
  const int64_t lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int64_t shards = ceil_div(in, r);
  const int64_t cs = indexer.column_stride;
  const int64_t seed = dropout.enabled ? dropout.seed() : 0;
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const gptr<const scalar_t> row = x + indexer.row_offset(n);
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
        // Only group 0 holds sums: with 128 < r < 256 threads r..255 form no whole group and
        // would otherwise write their zero over columns c = threadIdx.x - r (a race the
        // emulator caught; tests/test_emulated_cuda.py).
        if (group == 0 && c < r) fold[n * r + c] = acc;
      } else {
        partial[threadIdx.x] = acc;
        MISS_SYNC_THREADS();
        if (threadIdx.x < lanes) {
          acc_t sum = 0;
          for (int64_t g = 0; g < groups; ++g) sum += partial[g * lanes + threadIdx.x];
          fold[n * r + threadIdx.x] = sum;
        }
        MISS_SYNC_THREADS();
      }
    }
  }
}

// --- Elementwise updates of a contiguous [rows, width] array ---------------------------
// One kernel serves the tile-add into grad_x, the out-tiled add into y and the merge into W:
// each thread updates kVec consecutive elements with one 16-byte load and store when both
// arrays are 16-byte aligned (checked on the host), else one element at a time. `Update` maps
// (flat index, old value) to the new value; src may be dst.

template <int kVec, typename scalar_t, typename Update>
MISS_GLOBAL void update_rows_kernel(gptr<const scalar_t> src, gptr<scalar_t> dst, int64_t total, Update update) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x * kVec;
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; first < total;
       first += step) {
    if (first + kVec <= total) {
      device::Pack<scalar_t, kVec> pack = device::load_pack<kVec>(src + first);
      for (int k = 0; k < kVec; ++k) pack.v[k] = update(first + k, pack.v[k]);
      device::store_pack<kVec>(dst + first, pack);
    } else {
      for (int64_t index = first; index < total; ++index) dst[index] = update(index, src[index]);
    }
  }
}

template <typename scalar_t, typename Update>
void launch_update_rows(const at::Tensor& src_tensor, at::Tensor& dst_tensor, int64_t total, const Update& update) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(src_tensor.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dst_tensor.const_data_ptr()) % 16 == 0;
  const auto src = device::input<scalar_t>(src_tensor, "src");
  const auto dst = src_tensor.is_same(dst_tensor) ? device::inout<scalar_t>(dst_tensor, "dst")
                                                  : device::output<scalar_t>(dst_tensor, "dst");
  if (aligned) {
    MISS_LAUNCH(update_rows_kernel<kVec>, device::blocks_for(ceil_div(total, kVec)), kThreads, src, dst, total,
                update);
  } else {
    MISS_LAUNCH(update_rows_kernel<1>, device::blocks_for(total), kThreads, src, dst, total, update);
  }
}

// grad_x[n, i] (+)= drop(n, i) * g[n, i % r]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct TileUpdate {
  gptr<const acc_t> g;
  int64_t in, r;
  DropoutParams dropout;
  bool accumulate;
  MISS_DEVICE scalar_t operator()(int64_t index, scalar_t old) const {
    const int64_t n = index / in, i = index % in;
    const int64_t seed = dropout.enabled ? dropout.seed() : 0;
    const acc_t value = g[n * r + i % r] * dropout_multiplier<acc_t>(dropout, seed, n, i);
    return static_cast<scalar_t>(accumulate ? static_cast<acc_t>(old) + value : value);
  }
};

// y[n, o] += v[n, o % m]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct OutTiledAdd {
  gptr<const acc_t> v;
  int64_t out, m;
  MISS_DEVICE scalar_t operator()(int64_t index, scalar_t old) const {
    const int64_t n = index / out, o = index % out;
    return static_cast<scalar_t>(static_cast<acc_t>(old) + v[n * m + o % m]);
  }
};

// W[o, i] + sign * B[i % r, o % m]
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct MergeUpdate {
  gptr<const acc_t> block;
  int64_t in, r, m;
  float sign;
  MISS_DEVICE scalar_t operator()(int64_t index, scalar_t old) const {
    const int64_t o = index / in, i = index % in;
    return static_cast<scalar_t>(static_cast<acc_t>(old) + sign * block[(i % r) * m + o % m]);
  }
};

template <typename scalar_t>
MISS_GLOBAL void shard_merge_finite_kernel(gptr<const scalar_t> MISS_RESTRICT weight, int64_t total,
                                           MergeUpdate<scalar_t> merged, gptr<int> MISS_RESTRICT all_finite) {
  MISS_GRID_STRIDE_LOOP(index, total) {
    // Atomic: many threads may find a non-finite value and clear the same flag.
    if (!device::is_finite(static_cast<double>(merged(index, weight[index])))) device::atomic_store(all_finite, 0);
  }
}

}  // namespace

void shard_fold(const at::Tensor& x, const DropoutParams& dropout, at::Tensor& fold) {
  const int64_t rows = fold.size(0), r = fold.size(1), in = x.size(-1);
  if (rows == 0) return;
  MISS_DEVICE_GUARD(x);
  const RowIndexer indexer = make_row_indexer(x);
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(rows, 65535 * 16));
  MISS_DISPATCH_FLOAT(x.scalar_type(), "miss_shard_fold_cuda", [&] {
    const auto x_ptr = device::input<scalar_t>(x, "x");
    const auto fold_ptr = device::output<at::opmath_type<scalar_t>>(fold, "fold");
    MISS_LAUNCH(shard_fold_kernel<scalar_t>, grid, kThreads, x_ptr, indexer, rows, in, r, dropout, fold_ptr);
  });
}

void shard_tile(at::Tensor& grad_x, const at::Tensor& g, const DropoutParams& dropout, bool accumulate) {
  const int64_t rows = grad_x.size(0), in = grad_x.size(1), r = g.size(1);
  if (grad_x.numel() == 0) return;
  MISS_DEVICE_GUARD(grad_x);
  MISS_DISPATCH_FLOAT(grad_x.scalar_type(), "miss_shard_tile_cuda", [&] {
    const TileUpdate<scalar_t> update{device::input<at::opmath_type<scalar_t>>(g, "g"), in, r, dropout, accumulate};
    launch_update_rows<scalar_t>(grad_x, grad_x, rows * in, update);
  });
}

void add_out_tiled(at::Tensor& y, const at::Tensor& v) {
  const int64_t rows = y.size(0), out = y.size(1), m = v.size(1);
  if (y.numel() == 0) return;
  MISS_DEVICE_GUARD(y);
  MISS_DISPATCH_FLOAT(y.scalar_type(), "miss_add_out_tiled_cuda", [&] {
    const OutTiledAdd<scalar_t> update{device::input<at::opmath_type<scalar_t>>(v, "v"), out, m};
    launch_update_rows<scalar_t>(y, y, rows * out, update);
  });
}

void shard_merge(const at::Tensor& weight, const at::Tensor& block_acc, float sign, at::Tensor& result) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return;
  MISS_DEVICE_GUARD(weight);
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_cuda", [&] {
    const MergeUpdate<scalar_t> update{device::input<at::opmath_type<scalar_t>>(block_acc, "block"), in,
                                       block_acc.size(0), block_acc.size(1), sign};
    launch_update_rows<scalar_t>(weight, result, out * in, update);
  });
}

bool shard_merge_is_finite(const at::Tensor& weight, const at::Tensor& block_acc, float sign) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return true;
  MISS_DEVICE_GUARD(weight);
  at::Tensor all_finite = at::ones({1}, weight.options().dtype(at::kInt));
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_finite_cuda", [&] {
    const MergeUpdate<scalar_t> merged{device::input<at::opmath_type<scalar_t>>(block_acc, "block"), in,
                                       block_acc.size(0), block_acc.size(1), sign};
    const auto weight_ptr = device::input<scalar_t>(weight, "weight");
    const auto flag = device::inout<int>(all_finite, "all_finite");
    MISS_LAUNCH(shard_merge_finite_kernel<scalar_t>, device::blocks_for(out * in), kThreads, weight_ptr,
                out * in, merged, flag);
  });
  return all_finite.item<int>() == 1;
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
