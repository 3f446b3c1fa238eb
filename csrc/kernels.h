// The kernels behind the ops, one declaration per device, and the routing between them.
// The ops (csrc/ops/) check arguments, allocate outputs and call ATen for the large GEMMs;
// everything MiSS-specific and memory-bound runs in these kernels.
//
// Conventions for every kernel: outputs are allocated by the caller; "acc" tensors (fold, g,
// v, the converted block `block_acc`) have the accumulation dtype of
// the data (float64 for float64 data, float32 otherwise: checks.h accumulate_dtype) and are
// contiguous; sizes come from the tensors; N == 0 and empty tensors are allowed.
#pragma once

#include "philox_dropout.h"
#include "torch_api.h"

#define MISS_DECLARE_KERNELS                                                                   \
  /* fold[n, c] = sum over i % r == c of drop(x)[n, i]; x [..., in] any strides; fold [N, r] */ \
  void shard_fold(const Tensor& x, const DropoutParams& dropout, Tensor& fold);        \
  /* grad_x[n, i] (+)= drop(n, i) * g[n, i % r]; grad_x [N, in] contiguous; g [N, r] */         \
  void shard_tile(Tensor& grad_x, const Tensor& g, const DropoutParams& dropout,       \
                  bool accumulate);                                                            \
  /* y[n, o] += v[n, o % m]; y [N, out] contiguous; v [N, m] */                                 \
  void add_out_tiled(Tensor& y, const Tensor& v);                                      \
  /* out[o, i] = W[o, i] + sign * B[i % r, o % m]; block_acc [r, m]; out may be weight */      \
  void shard_merge(const Tensor& weight, const Tensor& block_acc, float sign,          \
                   Tensor& out);                                                           \
  /* whether every W[o, i] + sign * B[i % r, o % m] is finite, without writing W */            \
  bool shard_merge_is_finite(const Tensor& weight, const Tensor& block_acc, float sign);    \
  /* t3[k, a * (in / r) + j, c] += sign * B[k, a, c]: the "+ B_k" of every tile of a BAT */   \
  /* transform; t3 [K, in, r] and block_acc [K, r, r] contiguous, both of the acc dtype */     \
  void add_block_rows(Tensor& t3, const Tensor& block_acc, double sign);

// Which bfloat16 piece of a float32 value each slot of a bf16_pieces output holds: piece 0 is
// bf16(t), piece 1 bf16(t - piece 0), piece 2 bf16(t - piece 0 - piece 1). Three pieces
// carry t's 24 significand bits; products of pieces with bf16 data are exact in float32.
struct PiecePattern {
  int slots;
  int piece[4];
};

// Kernels only the CUDA path has (the CPU runs these GEMMs in float32).
#define MISS_DECLARE_CUDA_ONLY_KERNELS                                                          \
  /* out = bf16 pieces of a float32 [rows, cols] t side by side: [slots * rows, cols] when */   \
  /* along_rows, else [rows, slots * cols]; slot s holds piece pattern.piece[s] */              \
  void bf16_pieces(const Tensor& t, const PiecePattern& pattern, bool along_rows, Tensor& out); \
  /* y[n, o] = v[n, o % m] (+ bias[o]), y only written; y [N, out] contiguous; v [N, m] acc */  \
  void write_out_tiled(Tensor& y, const Tensor& v, const OptTensor& bias);                    \
  /* out = W + W B_k + B_k per r x r tile (bat), float32 math, out in W's dtype (may be W); */ \
  /* W float32/16-bit [rows, cols] with unit column stride (a column slab of a weight), out */ \
  /* contiguous; block_acc [rows / r, r, r] float32; bat_transform_fits(r) */                 \
  void bat_transform(const Tensor& weight, const Tensor& block_acc, Tensor& out);            \
  /* grad_block[k] (+)= sum_j (W_kj + I)^T G_kj on tensor cores (bat's dB from G = dW'): W */ \
  /* bf16 and G float32 [rows, cols] with unit column stride (column slabs), grad_block */    \
  /* [rows / r, r, r] float32 contiguous, added into when accumulate; ran = false (nothing */ \
  /* done) where the kernel cannot run: the caller then uses its batched GEMMs */             \
  /* With groups > 1 (bat_block_grad_groups) grad_block is [groups, rows / r, r, r]: one */   \
  /* partial dB per group of a row-block's tiles, written (not accumulated), which the */        \
  /* caller sums */                                                                              \
  void bat_block_grad_mma(const Tensor& grad_weight, const Tensor& weight, Tensor& grad_block, bool accumulate, \
                          bool& ran);                                                                      \
  /* how many groups bat_block_grad_mma splits each row-block's tiles into on this device, */  \
  /* for a [rows, cols] slab of W and rank r: 1 where the row-blocks alone fill the SMs */     \
  void bat_block_grad_groups(const Tensor& weight, int64_t r, int64_t& groups);              \
  /* W <- W M_k + M_k - I per r x r tile, M_k = inv(I + B_k) float32 [out / r, r, r] (bat unmerge: */      \
  /* (W' - B_k) M_k) on tensor cores, in place; only where bat_untransform_mma_fits(W, r) */                  \
  void bat_untransform_mma(Tensor& weight, const Tensor& inverse);                                          \
  /* whether bat_untransform_mma takes this weight and rank (bf16, contiguous, aligned, r % 16 */            \
  /* == 0, r <= 64, a device with mma.sync); else unmerge runs as float64 GEMMs */                          \
  void bat_untransform_mma_fits(const Tensor& weight, int64_t r, bool& fits);                               \
  /* inverse[k] = inv(I + B_k) (float32 or float64) and condition[k] its 1-norm condition */                \
  /* number (float64; +inf where singular), computed in float64; block_acc [K, r, r] float32 */             \
  /* or float64 contiguous, r <= kBatMaxRank */                                                              \
  void bat_inverse(const Tensor& block_acc, Tensor& inverse, Tensor& condition);

namespace miss {

// The shapes the CUDA kernel bat_transform takes (csrc/cuda/bat_kernels.cuh): a tile of W and
// B_k in shared memory (r <= 64), and 4 x 4 outputs per thread (r % 4 == 0).
constexpr int kBatMaxRank = 64;
constexpr int kBatPiece = 4;
inline bool bat_transform_fits(int64_t r) { return r % kBatPiece == 0 && r <= kBatMaxRank; }

namespace cpu {
MISS_DECLARE_KERNELS
}
#ifdef MISS_WITH_CUDA
namespace cuda {
MISS_DECLARE_KERNELS
MISS_DECLARE_CUDA_ONLY_KERNELS
}
#endif
#ifdef MISS_WITH_EMULATOR
// The CUDA kernels compiled for the host and run under the emulator (csrc/emulator/).
namespace emulated_cuda {
MISS_DECLARE_KERNELS
MISS_DECLARE_CUDA_ONLY_KERNELS
}
// True while an op of the miss_emulated_cuda namespace runs on this thread: its body then
// takes every decision as for CUDA, and its kernels run under the emulator.
bool emulating_cuda();
#else
inline bool emulating_cuda() { return false; }
#endif

// Whether a decision about `t` is to be taken as for CUDA: a CUDA tensor, or any tensor of
// an emulated-CUDA op.
inline bool on_cuda_path(const Tensor& t) { return t.is_cuda() || emulating_cuda(); }
}  // namespace miss

#undef MISS_DECLARE_KERNELS
#undef MISS_DECLARE_CUDA_ONLY_KERNELS

// Calls the CUDA-only kernel NAME (MISS_DECLARE_CUDA_ONLY_KERNELS) of the device the op runs
// on: the emulated one while emulating, else the GPU's. A statement.
#if defined(MISS_WITH_EMULATOR)
#define MISS_CALL_EMULATED_ONLY(NAME, ...) ::miss::emulated_cuda::NAME(__VA_ARGS__)
#else
#define MISS_CALL_EMULATED_ONLY(NAME, ...) MISS_INTERNAL_ASSERT(false)
#endif
#if defined(MISS_WITH_CUDA)
#define MISS_CALL_GPU_ONLY(NAME, ...) ::miss::cuda::NAME(__VA_ARGS__)
#else
#define MISS_CALL_GPU_ONLY(NAME, ...) MISS_CHECK(false, "miss: " #NAME " runs on the CUDA path only")
#endif
#define MISS_CALL_CUDA_ONLY(NAME, ...)          \
  do {                                          \
    if (::miss::emulating_cuda()) {             \
      MISS_CALL_EMULATED_ONLY(NAME, __VA_ARGS__); \
    } else {                                    \
      MISS_CALL_GPU_ONLY(NAME, __VA_ARGS__);      \
    }                                           \
  } while (0)

// Calls the kernel NAME of the device that `TENSOR`'s op runs on: miss::cuda, the emulated
// CUDA device, or miss::cpu.
#if defined(MISS_WITH_EMULATOR)
#define MISS_ROUTE_EMULATED(NAME, ...) ::miss::emulating_cuda() ? ::miss::emulated_cuda::NAME(__VA_ARGS__) :
#else
#define MISS_ROUTE_EMULATED(NAME, ...)
#endif
#ifdef MISS_WITH_CUDA
#define MISS_ROUTE(TENSOR, NAME, ...)                                         \
  (MISS_ROUTE_EMULATED(NAME, __VA_ARGS__)(TENSOR).is_cuda() ? ::miss::cuda::NAME(__VA_ARGS__) \
                                                             : ::miss::cpu::NAME(__VA_ARGS__))
#else
#define MISS_ROUTE(TENSOR, NAME, ...) \
  (MISS_ROUTE_EMULATED(NAME, __VA_ARGS__)((void)(TENSOR), ::miss::cpu::NAME(__VA_ARGS__)))
#endif
