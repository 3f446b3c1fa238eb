// Counter-based dropout mask shared by the CPU and CUDA kernels.
//
// The mask of element (row n, column i) is a pure function of (seed, n, i), so the backward
// pass regenerates exactly the forward's mask instead of storing N x in bytes, and a CUDA
// kernel produces the same bits as the CPU kernel for the same seed. Rows are logical rows
// of x flattened over its leading dims, never memory offsets: a strided x gets the same mask
// as its contiguous copy.
//
// One Philox4x32-10 call (Salmon et al., SC'11; the generator behind curand and torch's CUDA
// RNG) yields 128 bits, cut into eight 16-bit uniforms: columns 8q..8q+7 of a row share the
// call with counter (q, n_lo, n_hi, 0) and key (seed_lo, seed_hi). A 16-bit uniform resolves
// p to 1/65536; a column is kept when its uniform is >= round(p * 65536), and kept values are
// scaled by 1 / (1 - p) as torch.nn.Dropout does.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MISS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MISS_HOST_DEVICE inline
#endif

namespace miss {

// Philox4x32-10 on kLanes independent counters at once, in place: counter[w][l] is word w of
// lane l; every lane uses the key (k0, k1). Written lane by lane so that a CPU compiler
// vectorises the lanes (the 32 x 32 -> 64-bit products become vpmuludq); CUDA uses one lane.
template <int kLanes>
MISS_HOST_DEVICE void philox4x32_10_lanes(uint32_t (&counter)[4][kLanes], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * counter[0][l];
      const uint64_t p1 = static_cast<uint64_t>(kMul1) * counter[2][l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ counter[1][l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ counter[3][l] ^ k1;
      counter[1][l] = static_cast<uint32_t>(p1);
      counter[3][l] = static_cast<uint32_t>(p0);
      counter[0][l] = n0;
      counter[2][l] = n2;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// Everything a kernel needs to apply or regenerate one dropout mask. Built on the host by
// make_dropout_params (csrc/ops/common.h); copied by value into CUDA kernels.
struct DropoutParams {
  bool enabled = false;        // p > 0 and a seed was given
  uint32_t threshold = 0;      // keep iff uniform16 >= threshold
  double scale = 1.0;          // 1 / (1 - p); 0 when p == 1 (kernels cast it to their type)
  const int64_t* seed_ptr = nullptr;  // seed in memory the kernel can read (device or host)
  int64_t seed_value = 0;      // used when seed_ptr is null (a CPU seed for a CUDA kernel)

  MISS_HOST_DEVICE int64_t seed() const { return seed_ptr != nullptr ? *seed_ptr : seed_value; }
};

constexpr int64_t kMaskColumnsPerCall = 8;

MISS_HOST_DEVICE uint32_t dropout_threshold(double p) {
  if (p <= 0.0) return 0u;
  if (p >= 1.0) return 65536u;  // no 16-bit uniform reaches it: every column dropped
  return static_cast<uint32_t>(p * 65536.0 + 0.5);
}

// The keep mask (1 kept, 0 dropped) of columns 8 * first_group .. 8 * (first_group + kLanes)
// of row n, as floats: keep[8 * l + k] is column 8 * (first_group + l) + k. The CPU kernels
// call it with 32 lanes; dropout_keep_bits below is the one-group form the CUDA kernels use.
template <int kLanes>
MISS_HOST_DEVICE void dropout_keep_mask(int64_t seed, uint32_t threshold, int64_t row,
                                        int64_t first_group, float* keep) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t n = static_cast<uint64_t>(row);
  uint32_t counter[4][kLanes];
  for (int l = 0; l < kLanes; ++l) {
    counter[0][l] = static_cast<uint32_t>(first_group) + static_cast<uint32_t>(l);
    counter[1][l] = static_cast<uint32_t>(n);
    counter[2][l] = static_cast<uint32_t>(n >> 32);
    counter[3][l] = 0u;
  }
  philox4x32_10_lanes<kLanes>(counter, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  for (int w = 0; w < 4; ++w) {
    for (int l = 0; l < kLanes; ++l) {
      keep[l * 8 + 2 * w] = static_cast<float>((counter[w][l] & 0xFFFFu) >= threshold);
      keep[l * 8 + 2 * w + 1] = static_cast<float>((counter[w][l] >> 16) >= threshold);
    }
  }
}

// The eight keep bits of columns 8q..8q+7 of row n, bit k for column 8q+k: the one-group
// form of dropout_keep_mask (the CUDA kernels' per-element use), so that the CPU kernels, which
// call the 32-lane form, exercise the same code.
MISS_HOST_DEVICE uint32_t dropout_keep_bits(int64_t seed, uint32_t threshold, int64_t row,
                                            int64_t column_group) {
  float keep[kMaskColumnsPerCall];
  dropout_keep_mask<1>(seed, threshold, row, column_group, keep);
  uint32_t bits = 0;
  for (int k = 0; k < kMaskColumnsPerCall; ++k) bits |= static_cast<uint32_t>(keep[k] != 0.0f) << k;
  return bits;
}

// Multiplier of element (row, column): scale if kept, 0 if dropped, 1 without dropout.
template <typename acc_t>
MISS_HOST_DEVICE acc_t dropout_multiplier(const DropoutParams& d, int64_t seed, int64_t row,
                                          int64_t column) {
  if (!d.enabled) return acc_t(1);
  const uint32_t bits = dropout_keep_bits(seed, d.threshold, row, column / kMaskColumnsPerCall);
  return ((bits >> (column % kMaskColumnsPerCall)) & 1u) ? static_cast<acc_t>(d.scale) : acc_t(0);
}

}  // namespace miss
