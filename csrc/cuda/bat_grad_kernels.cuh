// BAT's block gradient on tensor cores (kernels.h bat_block_grad_mma):
//   dB_k (+)= sum_j (W_kj + I)^T G_kj   over the tiles j of a column slab of G = dL/dW',
// the products as bf16 mma.sync with float32 accumulation. G (float32) is split into three
// bf16 pieces g1 + g2 + g3 that hold all 24 bits of it, so the products are exact and only
// the float32 sums round, as in a float32 GEMM; W_kj is exact in bf16; the identity's term
// adds G itself (the three pieces summed in float32 give it back exactly). It replaces a
// float32 copy of W, a reduction over the tiles and a float32 (SIMT) batched GEMM.
//
// One block per row-block k, over the slab's tiles of that row-block: each dB_k has one
// owner, so a slab adds into what the previous slabs left with no atomics and no partial
// sums, in the same order every run. Warp w computes rows 16w .. 16w + 15 of dB_k. The tiles
// are staged transposed (the A operand's rows are columns of W_kj, the B operand's columns
// of G_kj) in rows padded as in the transform (mma_tiles.cuh). Compiled by nvcc
// (shard_kernels.cu) and for the emulator (csrc/emulator/emulated_kernels.cpp).
#pragma once

#include <cstdint>

#include "../kernels.h"
#include "device_api.cuh"
#include "mma_tiles.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

template <int r>
MISS_GLOBAL void bat_block_grad_mma_kernel(gptr<const float> grad_weight, int64_t g_ld, gptr<const BFloat16> weight,
                                           int64_t w_ld, int64_t tiles_per_row, bool accumulate,
                                           gptr<float> grad_block) {
  constexpr int ld = r + kTilePad;
  MISS_SHARED_ARRAY(BFloat16, w_t, r * ld);   // W_kj transposed: [c][a]
  MISS_SHARED_ARRAY(BFloat16, g1_t, r * ld);  // the pieces of G_kj transposed: [c][a]
  MISS_SHARED_ARRAY(BFloat16, g2_t, r * ld);
  MISS_SHARED_ARRAY(BFloat16, g3_t, r * ld);
  const int64_t k = blockIdx.x;
  const int64_t lane = threadIdx.x % 32, group = lane / 4, pair = (lane % 4) * 2;
  const int64_t row0 = (threadIdx.x / 32) * kMmaRows;  // this warp's rows of dB_k
  float acc[r / kMmaCols][4] = {};
  for (int64_t j = 0; j < tiles_per_row; ++j) {
    const gptr<const float> g = grad_weight + (k * r) * g_ld + j * r;  // row a of the tile: g + a * g_ld
    const gptr<const BFloat16> w = weight + (k * r) * w_ld + j * r;
    for (int64_t e = threadIdx.x; e < r * r; e += blockDim.x) {
      const int64_t a = e / r, c = e % r, at = c * ld + a;
      BFloat16 piece[3];
      split_bf16(g[a * g_ld + c], piece);
      g1_t[at] = piece[0];
      g2_t[at] = piece[1];
      g3_t[at] = piece[2];
      w_t[at] = w[a * w_ld + c];
    }
    MISS_SYNC_THREADS();
    for (int s = 0; s < r / kMmaDepth; ++s) {
      uint32_t a_frag[4];
      load_a_fragment(w_t + row0 * ld + s * kMmaDepth, ld, a_frag);
      for (int n = 0; n < r / kMmaCols; ++n) {
        const int64_t at = n * kMmaCols * ld + s * kMmaDepth;
        uint32_t b[2];
        load_b_fragment(g3_t + at, ld, b);  // the smallest piece first
        device::mma_m16n8k16_bf16(a_frag, b, acc[n]);
        load_b_fragment(g2_t + at, ld, b);
        device::mma_m16n8k16_bf16(a_frag, b, acc[n]);
        load_b_fragment(g1_t + at, ld, b);
        device::mma_m16n8k16_bf16(a_frag, b, acc[n]);
      }
    }
    for (int n = 0; n < r / kMmaCols; ++n) {  // the identity's term: G_kj at this lane's outputs
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + group + 8 * (i / 2), col = n * kMmaCols + pair + i % 2, at = col * ld + row;
        acc[n][i] += static_cast<float>(g1_t[at]) + static_cast<float>(g2_t[at]) + static_cast<float>(g3_t[at]);
      }
    }
    MISS_SYNC_THREADS();  // the next tile overwrites the staged one
  }
  const gptr<float> out = grad_block + k * r * r;
  for (int n = 0; n < r / kMmaCols; ++n) {
    for (int i = 0; i < 4; ++i) {
      const int64_t e = (row0 + group + 8 * (i / 2)) * r + n * kMmaCols + pair + i % 2;
      out[e] = accumulate ? out[e] + acc[n][i] : acc[n][i];
    }
  }
}

}  // namespace

void bat_block_grad_mma(const Tensor& grad_weight, const Tensor& weight, Tensor& grad_block, bool accumulate,
                        bool& ran) {
  const int64_t rows = weight.size(0), cols = weight.size(1), r = grad_block.size(-1);
  ran = false;
  MISS_DEVICE_GUARD(weight);
  const bool fits = weight.scalar_type() == kBFloat16 && grad_weight.scalar_type() == kFloat &&
                    grad_block.scalar_type() == kFloat && mma_rank_fits(r) && weight.stride(1) == 1 && grad_weight.stride(1) == 1 && grad_block.is_contiguous();
  if (!fits || !device::has_mma()) return;
  ran = true;
  if (grad_block.numel() == 0) return;
  if (cols == 0) {  // no tiles: dB_k = 0, or unchanged when accumulating
    if (!accumulate) torch::stable::zero_(grad_block);
    return;
  }
  const auto g = device::input<float>(grad_weight, "grad_weight");
  const auto w = device::input<BFloat16>(weight, "weight");
  const auto out = accumulate ? device::inout<float>(grad_block, "grad_block")
                              : device::output<float>(grad_block, "grad_block");
  const unsigned int grid = static_cast<unsigned int>(rows / r);
  const int64_t g_ld = grad_weight.stride(0), w_ld = weight.stride(0), tiles = cols / r;
  with_mma_rank(r, [&](auto rank) {
    constexpr int kRank = decltype(rank)::value;
    MISS_LAUNCH(bat_block_grad_mma_kernel<kRank>, grid, 32 * (kRank / kMmaRows), g, g_ld, w, w_ld, tiles, accumulate,
                out);
  });
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
