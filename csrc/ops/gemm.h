// GEMMs of the op bodies whose best form differs between the CPU and CUDA.
//
// On CUDA the thin GEMMs of standard MiSS with bfloat16 activations run on tensor cores:
// cuBLAS takes bf16 operands and accumulates in float32, but the fold f and the block B are
// float32. Each float32 operand is split into bf16 pieces (bf16_pieces_of) whose sum carries
// its significand (two pieces: 16 bits, three: all 24), the pieces are laid side by side
// along the contraction or output dimension, and one GEMM computes the sum of the piece
// products: exact products, float32 accumulation, no float32 copy of the [N, out] data.
// The CPU keeps float32 GEMMs (this CPU's float32 GEMMs are ~7x faster than its bf16 ones).
//
// The emulated CUDA device takes every CUDA decision and computes each cuBLAS call with the
// CPU's float32 GEMM inside a profiler range named after the call it stands in for
// ("miss::cuda_stand_in::<call>"), with cuBLAS's numerics: float32 accumulation of the
// given bf16 operands, one rounding on store.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <initializer_list>

#include "../kernels.h"

namespace miss {

// a @ b with an `acc` (float32) result from float16/bfloat16 operands. On CUDA one tensor-core
// GEMM that accumulates and writes float32 (aten::mm.dtype): no float32 copies of a and b
// (for bat's G = dy^T x, two activation-sized copies and an fp32 GEMM ~12x slower). On the CPU
// float32 copies: there is no CPU mm.dtype.
inline at::Tensor mm_accumulate(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc && b.scalar_type() == acc) return at::mm(a, b);
  if (!on_cuda_path(a)) return at::mm(a.to(acc), b.to(acc));
  if (a.is_cuda()) return at::mm(a, b, acc);
  RECORD_FUNCTION("miss::cuda_stand_in::mm.dtype", std::vector<c10::IValue>({a, b}));
  return at::mm(a.to(acc), b.to(acc));
}

// y += a @ b in place on a bf16 y from bf16 a and b: one cuBLAS GEMM with beta = 1, which
// accumulates a @ b + y in float32 and rounds once into y.
inline void addmm_accumulate_(at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  if (y.is_cuda()) {
    y.addmm_(a, b);
    return;
  }
  RECORD_FUNCTION("miss::cuda_stand_in::addmm_", std::vector<c10::IValue>({y, a, b}));
  y.copy_(at::addmm(y.to(at::kFloat), a.to(at::kFloat), b.to(at::kFloat)));
}

// Whether the thin GEMMs of a shard op over `data` ([N, *] activations or gradients) run on
// bf16 pieces (see the top of this file). Not for float16: its exponent range would flush
// the small pieces of a float32 value to zero and overflow on large folds.
inline bool thin_gemms_on_pieces(const at::Tensor& data) {
  return on_cuda_path(data) && data.scalar_type() == at::kBFloat16;
}

// The bf16 pieces of a float32 [rows, cols] t, slot s holding piece pieces[s]: side by side
// along dim 0 ([slots * rows, cols]) or dim 1 ([rows, slots * cols]). One kernel launch.
inline at::Tensor bf16_pieces_of(const at::Tensor& t, std::initializer_list<int> pieces, int64_t dim) {
  PiecePattern pattern{static_cast<int>(pieces.size()), {0, 0, 0, 0}};
  int slot = 0;
  for (int piece : pieces) pattern.piece[slot++] = piece;
  const int64_t rows = t.size(0), cols = t.size(1), slots = pattern.slots;
  at::Tensor out = at::empty(dim == 0 ? std::vector<int64_t>{slots * rows, cols} : std::vector<int64_t>{rows, slots * cols},
                             t.options().dtype(at::kBFloat16));
  const at::Tensor src = t.contiguous();
#if defined(MISS_WITH_EMULATOR)
  if (emulating_cuda()) {
    emulated_cuda::bf16_pieces(src, pattern, dim == 0, out);
    return out;
  }
#endif
#if defined(MISS_WITH_CUDA)
  TORCH_CHECK(src.is_cuda(), "miss: bf16_pieces_of runs on the CUDA path only");
  cuda::bf16_pieces(src, pattern, dim == 0, out);
#else
  TORCH_CHECK(false, "miss: bf16_pieces_of runs on the CUDA path only");
#endif
  return out;
}

}  // namespace miss
