// BAT's transform and its inverse as CUDA kernels (kernels.h bat_transform, bat_untransform_mma;
// the inverses of I + B_k themselves: bat_inverse_kernels.cuh):
// W'_kj = W_kj + W_kj B_k + B_k for every r x r tile (forward, dx, merge) and W_kj =
// (W'_kj - B_k) inv(I + B_k) (unmerge), computed in float32 and written once in W's dtype. The
// batched-GEMM form (ops/bat_batched.cpp) needs W and W' as weight-sized float32 tensors when
// W is 16-bit (two copies and two passes over them); here each tile is read once and written once.
//
// A bf16 W with r % 16 == 0 (the benchmark's case) runs on tensor cores (tile_product_mma):
// at r = 64 the float32 multiply-adds on SIMT cores would take longer than the pass over W
// itself. The transform of other shapes and dtypes (fp16, fp32, r % 16 != 0, r <= 64) runs on
// SIMT cores (bat_transform_kernel); the host routes larger r, and unmerge of those, to the
// batched GEMMs. Each block stages a tile before writing it, so the output may be W itself
// (in place). Compiled by nvcc (shard_kernels.cu) and by the host compiler for the emulator
// (csrc/emulator/emulated_kernels.cpp), which also emulates the mma instruction.
#pragma once

#include <cstdint>

#include "../kernels.h"
#include "device_api.cuh"
#include "mma_tiles.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

// SIMT: one block per tile (grid-stride over tiles): the tile of W and B_k are staged in shared
// memory, and each of the (r/4)^2 threads computes a 4 x 4 piece of the tile, so that every
// pair of shared loads feeds two multiply-adds (a thread per element would need two loads
// per multiply-add and be bound by shared-memory bandwidth). r % 4 == 0.
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
MISS_GLOBAL void bat_transform_kernel(gptr<const scalar_t> weight, int64_t w_ld, gptr<const acc_t> block,
                                      int64_t out_rows, int64_t in, int64_t r, gptr<scalar_t> result) {
  MISS_SHARED_ARRAY(acc_t, w_tile, kBatMaxRank * kBatMaxRank);
  MISS_SHARED_ARRAY(acc_t, b_tile, kBatMaxRank * kBatMaxRank);
  const int64_t tiles_per_row = in / r, tiles = (out_rows / r) * tiles_per_row;
  const int64_t pieces = r / kBatPiece;
  const int64_t a0 = (threadIdx.x / pieces) * kBatPiece, c0 = (threadIdx.x % pieces) * kBatPiece;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t k = tile / tiles_per_row, j = tile % tiles_per_row;
    const gptr<const scalar_t> w = weight + (k * r) * w_ld + j * r;  // row a of the tile: w + a * w_ld
    for (int64_t e = threadIdx.x; e < r * r; e += blockDim.x) {
      w_tile[e] = static_cast<acc_t>(w[(e / r) * w_ld + e % r]);
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

// Tensor cores: out_kj = W_kj P_k + P_k + (W_kj, or -I), the products as bf16 mma.sync with float32
// accumulation. Merge (the transform, kMerge): P = B_k, out = W B + B + W. Unmerge: P = M_k =
// inv(I + B_k), out = W' M + M - I, which is (W' - B_k) M_k since B_k M_k = I - M_k. P (float32) is
// split into kPieces bf16 pieces: two carry 16 of its 24 bits, enough for the transform (the
// products' error, about 2^-17 |W_kj| |B_k|, is far below the bf16 rounding of W', 2^-9 |W'|);
// three carry all of them, as unmerge needs (the inverse amplifies what it is given by up to
// its condition number). Warp w of the r / 16 warps computes rows 16w .. 16w + 15 of the tile,
// 8 columns at a time; its A fragments (W's rows) are loaded once per tile. Each block takes a
// run of consecutive tiles, so P_k is staged once per row-block k it meets rather than per
// tile; the epilogue reads P_k itself from global memory (r x r per row-block, cached), which
// leaves shared memory to three pieces. Shared rows are
// padded (mma_tiles.cuh). W's rows and the output 16-byte aligned (the launcher checks). r is
// a template argument, so that the fragment loops unroll and A stays in registers.
template <int r, int kPieces, bool kMerge>
MISS_DEVICE void tile_product_mma(gptr<const BFloat16> weight, int64_t w_ld, gptr<const float> p, int64_t out_rows,
                                  int64_t in, gptr<BFloat16> result) {
  static_assert(kPieces == 2 || kPieces == 3, "two or three bf16 pieces of P");
  constexpr int ld = r + kTilePad;
  MISS_SHARED_ARRAY(BFloat16, w_tile, r * ld);  // [a][c], row stride ld
  MISS_SHARED_ARRAY(BFloat16, p1_t, r * ld);    // the pieces of P_k transposed: [c][d]
  MISS_SHARED_ARRAY(BFloat16, p2_t, r * ld);
  MISS_SHARED_ARRAY(BFloat16, p3_t, kPieces == 3 ? r * ld : 2);
  const int64_t tiles_per_row = in / r, tiles = (out_rows / r) * tiles_per_row;
  const int64_t per_block = (tiles + gridDim.x - 1) / gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * per_block, last = std::min(tiles, first + per_block);
  const int64_t lane = threadIdx.x % 32, group = lane / 4, pair = (lane % 4) * 2;
  const int64_t row0 = (threadIdx.x / 32) * kMmaRows;  // this warp's rows of the tile
  int64_t staged_k = -1;
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t k = tile / tiles_per_row, j = tile % tiles_per_row;
    if (k != staged_k) {  // the same for every thread of the block
      for (int64_t e = threadIdx.x; e < r * r; e += blockDim.x) {
        BFloat16 piece[kPieces];
        split_bf16(p[k * r * r + e], piece);
        const int64_t transposed = (e % r) * ld + e / r;
        p1_t[transposed] = piece[0];
        p2_t[transposed] = piece[1];
        if constexpr (kPieces == 3) p3_t[transposed] = piece[2];
      }
      staged_k = k;
    }
    const gptr<const BFloat16> w = weight + (k * r) * w_ld + j * r;  // row a of the tile: w + a * w_ld
    for (int64_t e = threadIdx.x * 8; e < r * r; e += blockDim.x * 8) {
      device::store_pack<8>(w_tile + (e / r) * ld + e % r, device::load_pack<8>(w + (e / r) * w_ld + e % r));
    }
    MISS_SYNC_THREADS();
    uint32_t a[r / kMmaDepth][4];
    for (int s = 0; s < r / kMmaDepth; ++s) load_a_fragment(w_tile + row0 * ld + s * kMmaDepth, ld, a[s]);
    const gptr<BFloat16> out = result + (k * r) * in + j * r;
    for (int c0 = 0; c0 < r; c0 += kMmaCols) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int s = 0; s < r / kMmaDepth; ++s) {
        const int64_t at = c0 * ld + s * kMmaDepth;
        uint32_t b[2];
        if constexpr (kPieces == 3) {  // the smallest piece first
          load_b_fragment(p3_t + at, ld, b);
          device::mma_m16n8k16_bf16(a[s], b, acc);
        }
        load_b_fragment(p2_t + at, ld, b);
        device::mma_m16n8k16_bf16(a[s], b, acc);
        load_b_fragment(p1_t + at, ld, b);
        device::mma_m16n8k16_bf16(a[s], b, acc);
      }
      for (int64_t half = 0; half < 2; ++half) {  // rows group and group + 8 of the warp's 16
        const int64_t row = row0 + group + 8 * half, col = c0 + pair;
        device::Pack<BFloat16, 2> pack;
        for (int64_t i = 0; i < 2; ++i) {
          float value = acc[2 * half + i] + p[k * r * r + row * r + col + i];
          if constexpr (kMerge) {
            value += static_cast<float>(w_tile[row * ld + col + i]);
          } else if (row == col + i) {
            value -= 1.f;
          }
          pack.v[i] = static_cast<BFloat16>(value);
        }
        device::store_pack<2>(out + row * in + col, pack);
      }
    }
    MISS_SYNC_THREADS();  // the next tile overwrites the staged one (and P_k, at a new k)
  }
}

// W' = W B_k + W + B_k.
template <int r>
MISS_GLOBAL void bat_transform_mma_kernel(gptr<const BFloat16> weight, int64_t w_ld, gptr<const float> block,
                                          int64_t out_rows, int64_t in, gptr<BFloat16> result) {
  tile_product_mma<r, 2, true>(weight, w_ld, block, out_rows, in, result);
}

// W = W' M_k + M_k - I, M_k = inv(I + B_k).
template <int r>
MISS_GLOBAL void bat_untransform_mma_kernel(gptr<const BFloat16> merged, gptr<const float> inverse, int64_t out_rows,
                                            int64_t in, gptr<BFloat16> result) {
  tile_product_mma<r, 3, false>(merged, in, inverse, out_rows, in, result);
}

// Blocks for `tiles` tiles: the SIMT kernel takes one tile per turn of a grid-stride loop, 32
// blocks per SM; a tensor-core block takes a run of tiles and stages P_k once per row-block in
// it, so it gets 8 per SM, about as many as fit at once (28-37 KB of shared memory each): one
// wave, and runs of several tiles at the benchmark shape (4096 tiles on 132 SMs).
unsigned int tile_grid(int64_t tiles, int64_t blocks_per_sm) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(tiles, blocks_per_sm * device::sm_count())));
}
constexpr int64_t kSimtBlocksPerSm = 32, kMmaBlocksPerSm = 8;

}  // namespace

void bat_transform(const Tensor& weight, const Tensor& block_acc, Tensor& out) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = block_acc.size(-1), w_ld = weight.stride(0);
  if (weight.numel() == 0) return;
  MISS_INTERNAL_ASSERT(bat_transform_fits(r) && weight.stride(1) == 1 && w_ld >= in && out.is_contiguous() &&
                       block_acc.scalar_type() == kFloat);
  MISS_DEVICE_GUARD(weight);
  const int64_t tiles = (rows / r) * (in / r);
  if (weight.scalar_type() == kBFloat16 && mma_rank_fits(r) && aligned16(weight.const_data_ptr()) &&
      w_ld % 8 == 0 && aligned16(out.const_data_ptr()) && device::has_mma()) {
    const unsigned int grid = tile_grid(tiles, kMmaBlocksPerSm);
    const auto w = device::input<BFloat16>(weight, "weight");
    const auto b = device::input<float>(block_acc, "block");
    const auto res = weight.const_data_ptr() == out.const_data_ptr() ? device::inout<BFloat16>(out, "out")
                                                                     : device::output<BFloat16>(out, "out");
    with_mma_rank(r, [&](auto rank) {
      constexpr int kRank = decltype(rank)::value;
      MISS_LAUNCH(bat_transform_mma_kernel<kRank>, grid, 32 * (kRank / kMmaRows), w, w_ld, b, rows, in, res);
    });
    return;
  }
  const unsigned int grid = tile_grid(tiles, kSimtBlocksPerSm);
  const unsigned int threads = static_cast<unsigned int>((r / kBatPiece) * (r / kBatPiece));
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_transform_cuda", [&] {
    if constexpr (std::is_same_v<opmath_t<scalar_t>, float>) {
      const auto w = device::input<scalar_t>(weight, "weight");
      const auto b = device::input<float>(block_acc, "block");
      const auto res = weight.const_data_ptr() == out.const_data_ptr() ? device::inout<scalar_t>(out, "out")
                                                                       : device::output<scalar_t>(out, "out");
      MISS_LAUNCH(bat_transform_kernel<scalar_t>, grid, threads, w, w_ld, b, rows, in, r, res);
    } else {
      MISS_CHECK(false, "miss: bat_transform takes float32/float16/bfloat16 weights, got ", weight.scalar_type());
    }
  });
}

void bat_untransform_mma_fits(const Tensor& weight, int64_t r, bool& fits) {
  fits = false;
  if (weight.scalar_type() != kBFloat16 || !mma_rank_fits(r) || !weight.is_contiguous() ||
      !aligned16(weight.const_data_ptr())) {
    return;
  }
  MISS_DEVICE_GUARD(weight);
  fits = device::has_mma();
}

void bat_untransform_mma(Tensor& weight, const Tensor& inverse) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = inverse.size(-1);
  bool fits = false;
  bat_untransform_mma_fits(weight, r, fits);
  MISS_INTERNAL_ASSERT(fits && inverse.scalar_type() == kFloat && inverse.is_contiguous());
  if (weight.numel() == 0) return;
  MISS_DEVICE_GUARD(weight);
  const auto inv = device::input<float>(inverse, "inverse");
  const auto w = device::inout<BFloat16>(weight, "weight");  // in place: each tile staged before it is written
  const unsigned int grid = tile_grid((rows / r) * (in / r), kMmaBlocksPerSm);
  with_mma_rank(r, [&](auto rank) {
    constexpr int kRank = decltype(rank)::value;
    MISS_LAUNCH(bat_untransform_mma_kernel<kRank>, grid, 32 * (kRank / kMmaRows), w, inv, rows, in, w);
  });
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
