// What the tensor-core kernels (bat_kernels.cuh, bat_grad_kernels.cuh) share: the shape of
// one mma.sync.m16n8k16 (device_api.cuh mma_m16n8k16_bf16), the loads of its fragments from
// tiles staged in shared memory, the split of a float32 value into bf16 pieces (also what
// bf16_pieces_kernel writes for cuBLAS), and the ranks the kernels are instantiated for.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../kernels.h"
#include "device_api.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {

constexpr int kMmaRows = 16;   // rows of a warp's A fragment and of its output
constexpr int kMmaCols = 8;    // columns of an mma's output
constexpr int kMmaDepth = 16;  // the contracted dimension of one mma
// Staged r x r tiles have rows of r + 8 elements: a fragment load reads 8 rows at one column,
// and with r = 64 unpadded those rows would fall in the same shared-memory banks.
constexpr int kTilePad = 8;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// kPieces bf16 values whose sum is v: each the rounding of what the previous ones left (the
// subtraction is exact: the rounding error of a float32 to 8 bits). Two carry 16 of v's 24
// bits, three all of them.
template <int kPieces>
MISS_DEVICE void split_bf16(float v, BFloat16 (&piece)[kPieces]) {
  for (int p = 0; p < kPieces; ++p) {
    piece[p] = static_cast<BFloat16>(v);
    v -= static_cast<float>(piece[p]);
  }
}

// The calling lane's A fragment of the 16 x 16 block whose top-left element is `tile` (row
// stride ld): rows group and group + 8, columns pair, pair + 1 and pair + 8, pair + 9 (PTX ISA,
// "Matrix Fragments for mma.m16n8k16 with floating point type").
template <typename Ptr>
MISS_DEVICE void load_a_fragment(Ptr tile, int64_t ld, uint32_t (&a)[4]) {
  const int64_t lane = threadIdx.x % 32;
  const Ptr at = tile + (lane / 4) * ld + (lane % 4) * 2;
  a[0] = device::load_bits32(at);
  a[1] = device::load_bits32(at + 8 * ld);
  a[2] = device::load_bits32(at + 8);
  a[3] = device::load_bits32(at + 8 * ld + 8);
}

// The calling lane's B fragment of the 16 x 8 block (k x n) staged transposed, n-major: `tile_t`
// is element (n0, k0) of the [n][k] array, row stride ld. Column group, rows pair, pair + 1
// and pair + 8, pair + 9.
template <typename Ptr>
MISS_DEVICE void load_b_fragment(Ptr tile_t, int64_t ld, uint32_t (&b)[2]) {
  const int64_t lane = threadIdx.x % 32;
  const Ptr at = tile_t + (lane / 4) * ld + (lane % 4) * 2;
  b[0] = device::load_bits32(at);
  b[1] = device::load_bits32(at + 8);
}

// The ranks the tensor-core kernels are compiled for: multiples of 16 up to kBatMaxRank.
inline bool mma_rank_fits(int64_t r) { return r % kMmaDepth == 0 && r <= kBatMaxRank; }

// Calls f(std::integral_constant<int, r>{}) for an r that mma_rank_fits.
template <typename F>
void with_mma_rank(int64_t r, const F& f) {
  static_assert(kBatMaxRank == 64, "one instantiation per multiple of 16 up to kBatMaxRank");
  switch (r) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 48: f(std::integral_constant<int, 48>{}); break;
    default: f(std::integral_constant<int, 64>{}); break;
  }
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
