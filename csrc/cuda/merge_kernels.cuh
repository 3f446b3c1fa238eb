// CUDA kernels of the standard/mini merge and unmerge (W[o, i] + sign * B[i % r, o % m], in
// place or into another array) and of the safe merge's finiteness check, and their
// launchers: compiled by nvcc for the GPU (shard_kernels.cu) and by the host compiler for the
// emulator (csrc/emulator/emulated_kernels.cpp), through device_api.cuh.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../aten_calls.h"
#include "../kernels.h"
#include "device_api.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

using device::gptr;
using device::kThreads;

// --- Merge: W[o, i] + sign * B[i % r, o % m] -------------------------------------------
// One row o per blockIdx.y (grid-stride over rows), the columns of that row over blockIdx.x
// and the threads. The column index is 32-bit (the host checks in < 2^31) and the shard
// position i % r is stepped, not divided, so no 64-bit div/mod per element; the block comes
// transposed, Bt[o % m][i % r], so consecutive threads read consecutive floats of one row
// of Bt. kVec elements per thread with 16-byte loads and stores where every row start is
// aligned (checked on the host).
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
struct MergeRows {
  gptr<const scalar_t> weight;
  gptr<const acc_t> block_t;  // [m, r]
  int64_t out, m;
  int32_t in, r;
  float sign;
  MISS_DEVICE acc_t delta(int64_t o, int32_t c) const { return sign * block_t[(o % m) * r + c]; }
};

template <int kVec, typename scalar_t, typename acc_t = opmath_t<scalar_t>>
MISS_GLOBAL void shard_merge_kernel(MergeRows<scalar_t> merge, gptr<scalar_t> result) {
  const int32_t step = static_cast<int32_t>(blockDim.x * gridDim.x) * kVec;
  for (int64_t o = blockIdx.y; o < merge.out; o += gridDim.y) {
    const gptr<const scalar_t> w_row = merge.weight + o * merge.in;
    const gptr<scalar_t> out_row = result + o * merge.in;
    for (int32_t first = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x) * kVec; first < merge.in;
         first += step) {
      int32_t c = first % merge.r;  // one division per kVec elements, then stepped
      if (first + kVec <= merge.in) {
        device::Pack<scalar_t, kVec> pack = device::load_pack<kVec>(w_row + first);
        for (int k = 0; k < kVec; ++k) {
          pack.v[k] = static_cast<scalar_t>(static_cast<acc_t>(pack.v[k]) + merge.delta(o, c));
          c = c + 1 == merge.r ? 0 : c + 1;
        }
        device::store_pack<kVec>(out_row + first, pack);
      } else {
        for (int32_t i = first; i < merge.in; ++i) {
          out_row[i] = static_cast<scalar_t>(static_cast<acc_t>(w_row[i]) + merge.delta(o, c));
          c = c + 1 == merge.r ? 0 : c + 1;
        }
      }
    }
  }
}

template <typename scalar_t>
MISS_GLOBAL void shard_merge_finite_kernel(MergeRows<scalar_t> merge, gptr<int> MISS_RESTRICT all_finite) {
  for (int64_t o = blockIdx.y; o < merge.out; o += gridDim.y) {
    for (int32_t i = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x); i < merge.in;
         i += static_cast<int32_t>(blockDim.x * gridDim.x)) {
      const double merged = static_cast<double>(static_cast<scalar_t>(
          static_cast<opmath_t<scalar_t>>(merge.weight[o * merge.in + i]) + merge.delta(o, i % merge.r)));
      // Atomic: many threads may find a non-finite value and clear the same flag.
      if (!device::is_finite(merged)) device::atomic_store(all_finite, 0);
    }
  }
}

// The row-wise launch shape of the merge kernels: enough column blocks for one row, rows over
// gridDim.y (capped; the kernels stride over the rest).
auto merge_grid(int64_t out, int64_t in, int vec) {
  const int64_t column_blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(ceil_div(in, vec), kThreads), 1024));
  return device::grid_2d(static_cast<unsigned int>(column_blocks), static_cast<unsigned int>(std::min<int64_t>(out, 65535)));
}

template <typename scalar_t>
MergeRows<scalar_t> merge_rows(const Tensor& weight, const Tensor& block_t, float sign) {
  MISS_CHECK(weight.size(1) < (int64_t{1} << 31), "miss: merge of a weight with ", weight.size(1),
              " in_features (at most 2^31 - 1 per row on CUDA)");
  return MergeRows<scalar_t>{device::input<scalar_t>(weight, "weight"),
                             device::input<opmath_t<scalar_t>>(block_t, "block_t"), weight.size(0),
                             block_t.size(0), static_cast<int32_t>(weight.size(1)),
                             static_cast<int32_t>(block_t.size(1)), sign};
}

}  // namespace

void shard_merge(const Tensor& weight, const Tensor& block_acc, float sign, Tensor& result) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return;
  MISS_DEVICE_GUARD(weight);
  const Tensor block_t = aten::contiguous(aten::t(block_acc));  // [m, r]: coalesced reads
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(result.const_data_ptr()) % 16 == 0 &&
                         (in * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
    const MergeRows<scalar_t> merge = merge_rows<scalar_t>(weight, block_t, sign);
    const auto res = weight.const_data_ptr() == result.const_data_ptr() ? device::inout<scalar_t>(result, "result")
                                                                        : device::output<scalar_t>(result, "result");
    if (aligned) {
      MISS_LAUNCH(shard_merge_kernel<kVec>, merge_grid(out, in, kVec), kThreads, merge, res);
    } else {
      MISS_LAUNCH(shard_merge_kernel<1>, merge_grid(out, in, 1), kThreads, merge, res);
    }
  });
}

bool shard_merge_is_finite(const Tensor& weight, const Tensor& block_acc, float sign) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.numel() == 0) return true;
  MISS_DEVICE_GUARD(weight);
  const Tensor block_t = aten::contiguous(aten::t(block_acc));
  Tensor all_finite = aten::full({1}, 1.0, kInt, std::nullopt, weight.device());
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_finite_cuda", [&] {
    const MergeRows<scalar_t> merge = merge_rows<scalar_t>(weight, block_t, sign);
    const auto flag = device::inout<int>(all_finite, "all_finite");
    MISS_LAUNCH(shard_merge_finite_kernel<scalar_t>, merge_grid(out, in, 1), kThreads, merge, flag);
  });
  return item<int32_t>(all_finite) == 1;
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
