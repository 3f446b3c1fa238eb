// dst[c] = round(widen(src[c]) + add[c]) for c < n: the store loop of the merge and of the
// out-tiled add, one rounding to the data's dtype. src may be dst.
//
// float16/bfloat16 go through AVX2 (+F16C) code chosen at run time: the wheel is built for
// baseline x86-64, where c10's scalar conversions (a branch per element; software float16)
// made a bf16 merge ~2.9x and a fp16 merge ~15x one W.copy_() of the weight (2048 x 2048, 2-core
// EPYC). Both paths round to nearest even, as c10 does, so they give the same bits.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MISS_ADD_SPAN_AVX2 1
#endif

namespace miss {
namespace cpu {

template <typename scalar_t, typename acc_t>
inline void add_span_scalar(const scalar_t* src, const acc_t* add, int64_t n, scalar_t* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) + add[c]);
}

#ifdef MISS_ADD_SPAN_AVX2
inline bool cpu_has_avx2_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}

__attribute__((target("avx2,f16c"))) inline void add_span_avx2(const c10::Half* src, const float* add,
                                                              int64_t n, c10::Half* dst) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
    v = _mm256_add_ps(v, _mm256_loadu_ps(add + c));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  add_span_scalar(src + c, add + c, n - c, dst + c);
}

__attribute__((target("avx2"))) inline void add_span_avx2(const c10::BFloat16* src, const float* add,
                                                         int64_t n, c10::BFloat16* dst) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  const __m256i quiet_nan = _mm256_set1_epi32(0x7FC0);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
    const __m256 v = _mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)), _mm256_loadu_ps(add + c));
    // round to nearest even on the upper 16 bits: bits + 0x7FFF + (bit 16 of bits)
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, bias), lsb), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    // 8 x 32-bit -> 8 x 16-bit (packus works within 128-bit lanes; the permute joins them)
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_castsi256_si128(packed));
  }
  add_span_scalar(src + c, add + c, n - c, dst + c);
}
#endif

template <typename scalar_t, typename acc_t>
inline void add_span(const scalar_t* src, const acc_t* add, int64_t n, scalar_t* dst) {
#ifdef MISS_ADD_SPAN_AVX2
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_has_avx2_f16c()) return add_span_avx2(src, add, n, dst);
  }
#endif
  add_span_scalar(src, add, n, dst);
}

}  // namespace cpu
}  // namespace miss
