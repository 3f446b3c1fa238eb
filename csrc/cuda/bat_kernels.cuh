// The BAT transform as one CUDA kernel (kernels.h bat_transform): W'_kj = W_kj + W_kj B_k + B_k
// for every r x r tile, computed in float32 and written once in W's dtype. The batched-GEMM
// form (ops/bat_batched.cpp) needs W and W' as weight-sized float32 tensors when W is 16-bit
// (two copies and two passes over them); here each tile is read once and written once.
//
// One block per tile (grid-stride over tiles): the tile of W and B_k are staged in shared
// memory, and each of the (r/4)^2 threads computes a 4 x 4 piece of the tile, so that every
// pair of shared loads feeds two multiply-adds (a thread per element would need two loads
// per multiply-add and be bound by shared-memory bandwidth). r % 4 == 0 and r <= 64 (the
// host routes other shapes to the batched GEMMs). The tile is staged before any write, so W'
// may be W itself (an in-place merge). Compiled by nvcc (shard_kernels.cu) and by the host
// compiler for the emulator (csrc/emulator/emulated_kernels.cpp), like shard_kernels.cuh.
#pragma once

#include <cstdint>

#include "../kernels.h"
#include "device_api.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
MISS_GLOBAL void bat_transform_kernel(gptr<const scalar_t> weight, gptr<const acc_t> block, int64_t out_rows,
                                      int64_t in, int64_t r, gptr<scalar_t> result) {
  MISS_SHARED_ARRAY(acc_t, w_tile, kBatMaxRank * kBatMaxRank);
  MISS_SHARED_ARRAY(acc_t, b_tile, kBatMaxRank * kBatMaxRank);
  const int64_t tiles_per_row = in / r, tiles = (out_rows / r) * tiles_per_row;
  const int64_t pieces = r / kBatPiece;
  const int64_t a0 = (threadIdx.x / pieces) * kBatPiece, c0 = (threadIdx.x % pieces) * kBatPiece;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t k = tile / tiles_per_row, j = tile % tiles_per_row;
    const gptr<const scalar_t> w = weight + (k * r) * in + j * r;  // row a of the tile: w + a * in
    for (int64_t e = threadIdx.x; e < r * r; e += blockDim.x) {
      w_tile[e] = static_cast<acc_t>(w[(e / r) * in + e % r]);
      b_tile[e] = block[k * r * r + e];
    }
    MISS_SYNC_THREADS();
    acc_t acc[kBatPiece][kBatPiece];
    for (int i = 0; i < kBatPiece; ++i) {
      for (int l = 0; l < kBatPiece; ++l) acc[i][l] = 0;
    }
    for (int64_t d = 0; d < r; ++d) {
      acc_t wa[kBatPiece], bd[kBatPiece];
      for (int i = 0; i < kBatPiece; ++i) wa[i] = w_tile[(a0 + i) * r + d];
      for (int l = 0; l < kBatPiece; ++l) bd[l] = b_tile[d * r + c0 + l];
      for (int i = 0; i < kBatPiece; ++i) {
        for (int l = 0; l < kBatPiece; ++l) acc[i][l] += wa[i] * bd[l];
      }
    }
    device::note_fmas(static_cast<uint64_t>(r) * kBatPiece * kBatPiece);
    const gptr<scalar_t> out = result + (k * r) * in + j * r;
    for (int i = 0; i < kBatPiece; ++i) {
      for (int l = 0; l < kBatPiece; ++l) {
        const int64_t e = (a0 + i) * r + c0 + l;
        out[(a0 + i) * in + c0 + l] = static_cast<scalar_t>(acc[i][l] + w_tile[e] + b_tile[e]);
      }
    }
    MISS_SYNC_THREADS();  // the next tile overwrites the staged one
  }
}

}  // namespace

void bat_transform(const Tensor& weight, const Tensor& block_acc, Tensor& out) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = block_acc.size(-1);
  if (weight.numel() == 0) return;
  MISS_INTERNAL_ASSERT(bat_transform_fits(r) && weight.is_contiguous() && out.is_contiguous() &&
                       block_acc.scalar_type() == kFloat);
  MISS_DEVICE_GUARD(weight);
  const int64_t tiles = (rows / r) * (in / r);
  const unsigned int grid = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(tiles, 32 * device::sm_count())));
  const unsigned int threads = static_cast<unsigned int>((r / kBatPiece) * (r / kBatPiece));
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_transform_cuda", [&] {
    if constexpr (std::is_same_v<opmath_t<scalar_t>, float>) {
      const auto w = device::input<scalar_t>(weight, "weight");
      const auto b = device::input<float>(block_acc, "block");
      const auto res = weight.const_data_ptr() == out.const_data_ptr() ? device::inout<scalar_t>(out, "out")
                                                                       : device::output<scalar_t>(out, "out");
      MISS_LAUNCH(bat_transform_kernel<scalar_t>, grid, threads, w, b, rows, in, r, res);
    } else {
      MISS_CHECK(false, "miss: bat_transform takes float32/float16/bfloat16 weights, got ", weight.scalar_type());
    }
  });
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
