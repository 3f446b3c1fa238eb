// BAT's block gradient on tensor cores (kernels.h bat_block_grad_mma):
//   dB_k (+)= sum_j (W_kj + I)^T G_kj   over the tiles j of a column slab of G = dL/dW',
// the products as bf16 mma.sync with float32 accumulation. G (float32) is split into three
// bf16 pieces g1 + g2 + g3 that hold all 24 bits of it, so the products are exact and only
// the float32 sums round, as in a float32 GEMM; W_kj is exact in bf16; the identity's term
// adds G itself (the three pieces summed in float32 give it back exactly). It replaces a
// float32 copy of W, a reduction over the tiles and a float32 (SIMT) batched GEMM.
//
// Block (k, s) sums tile group s of row-block k (tiles_per_group consecutive tiles) into
// out[s][k]: each output has one owner, so there are no atomics and the sums come out in the
// same order every run. With one group, out is dB itself, and a slab adds into what the
// previous slabs left; with several, out holds one partial dB per group, which the caller sums
// (bat_block_grad_groups says how many: out / r row-blocks alone leave SMs idle, 64 blocks on
// an H100's 132 at the benchmark shape). Warp w computes rows 16w .. 16w + 15. The tiles
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
                                           int64_t w_ld, int64_t tiles_per_row, int64_t tiles_per_group,
                                           bool accumulate, gptr<float> out) {
  constexpr int ld = r + kTilePad;
  MISS_SHARED_ARRAY(BFloat16, w_t, r * ld);   // W_kj transposed: [c][a]
  MISS_SHARED_ARRAY(BFloat16, g1_t, r * ld);  // the pieces of G_kj transposed: [c][a]
  MISS_SHARED_ARRAY(BFloat16, g2_t, r * ld);
  MISS_SHARED_ARRAY(BFloat16, g3_t, r * ld);
  const int64_t k = blockIdx.x, group = blockIdx.y;
  const int64_t first = group * tiles_per_group;
  const int64_t last = first + tiles_per_group < tiles_per_row ? first + tiles_per_group : tiles_per_row;
  const int64_t lane = threadIdx.x % 32, quad = lane / 4, pair = (lane % 4) * 2;
  const int64_t row0 = (threadIdx.x / 32) * kMmaRows;  // this warp's rows of dB_k
  float acc[r / kMmaCols][4] = {};
  for (int64_t j = first; j < last; ++j) {
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
        const int64_t row = row0 + quad + 8 * (i / 2), col = n * kMmaCols + pair + i % 2, at = col * ld + row;
        acc[n][i] += static_cast<float>(g1_t[at]) + static_cast<float>(g2_t[at]) + static_cast<float>(g3_t[at]);
      }
    }
    MISS_SYNC_THREADS();  // the next tile overwrites the staged one
  }
  const gptr<float> sums = out + (group * gridDim.x + k) * r * r;
  for (int n = 0; n < r / kMmaCols; ++n) {
    for (int i = 0; i < 4; ++i) {
      const int64_t e = (row0 + quad + 8 * (i / 2)) * r + n * kMmaCols + pair + i % 2;
      sums[e] = accumulate ? sums[e] + acc[n][i] : acc[n][i];
    }
  }
}

// Whether the kernel takes this W (a column slab of it will do) at rank r, on this device.
bool block_grad_mma_takes(const Tensor& weight, int64_t r) {
  return weight.scalar_type() == kBFloat16 && mma_rank_fits(r) && weight.stride(1) == 1 && device::has_mma();
}

}  // namespace

// Groups of at least kMinTilesPerGroup tiles (each group's partial, r * r floats, is small
// beside the 8 tiles of G and W it reads), up to kBlocksPerSmTarget blocks per SM in all (a
// block stages one tile at a time with no asynchronous copies: several per SM hide the
// loads' latency). At the benchmark shape: 64 row-blocks x 8 groups of 8 tiles, a workspace
// of 8 x out x r floats (8 MiB).
constexpr int64_t kMinTilesPerGroup = 8;
constexpr int64_t kBlocksPerSmTarget = 4;

void bat_block_grad_groups(const Tensor& weight, int64_t r, int64_t& groups) {
  const int64_t row_blocks = weight.size(0) / r, tiles = weight.size(1) / r;
  groups = 1;
  MISS_DEVICE_GUARD(weight);
  if (row_blocks == 0 || !block_grad_mma_takes(weight, r)) return;
  const int64_t wanted = (kBlocksPerSmTarget * device::sm_count() + row_blocks - 1) / row_blocks;
  const int64_t most = tiles / kMinTilesPerGroup;
  const int64_t count = wanted < most ? wanted : most;
  if (count <= 1) return;
  const int64_t per_group = (tiles + count - 1) / count;
  groups = (tiles + per_group - 1) / per_group;
}

void bat_block_grad_mma(const Tensor& grad_weight, const Tensor& weight, Tensor& grad_block, bool accumulate,
                        bool& ran) {
  const int64_t rows = weight.size(0), cols = weight.size(1), r = grad_block.size(-1);
  ran = false;
  MISS_DEVICE_GUARD(weight);
  const bool fits = grad_weight.scalar_type() == kFloat && grad_weight.stride(1) == 1 &&
                    grad_block.scalar_type() == kFloat && grad_block.is_contiguous();
  if (!fits || !block_grad_mma_takes(weight, r)) return;
  ran = true;
  if (grad_block.numel() == 0) return;
  if (cols == 0) {  // no tiles: dB_k = 0, or unchanged when accumulating
    if (!accumulate) torch::stable::zero_(grad_block);
    return;
  }
  const int64_t row_blocks = rows / r, tiles = cols / r;
  const int64_t groups = grad_block.numel() / (row_blocks * r * r);
  MISS_CHECK(groups >= 1 && groups * row_blocks * r * r == grad_block.numel() && (groups == 1 || !accumulate),
             "miss: bat_block_grad_mma: grad_block must hold one [rows / r, r, r] block per group, and only one "
             "group accumulates");
  const int64_t per_group = (tiles + groups - 1) / groups;
  const auto g = device::input<float>(grad_weight, "grad_weight");
  const auto w = device::input<BFloat16>(weight, "weight");
  const auto out = accumulate ? device::inout<float>(grad_block, "grad_block")
                              : device::output<float>(grad_block, "grad_block");
  const auto grid = device::grid_2d(static_cast<unsigned int>(row_blocks), static_cast<unsigned int>(groups));
  const int64_t g_ld = grad_weight.stride(0), w_ld = weight.stride(0);
  with_mma_rank(r, [&](auto rank) {
    constexpr int kRank = decltype(rank)::value;
    MISS_LAUNCH(bat_block_grad_mma_kernel<kRank>, grid, 32 * (kRank / kMmaRows), g, g_ld, w, w_ld, tiles, per_group,
                accumulate, out);
  });
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
