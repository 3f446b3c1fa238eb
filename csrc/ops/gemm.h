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

#include <initializer_list>
#include <vector>

#include "../aten_calls.h"
#include "../kernels.h"

namespace miss {

// a @ b with an `acc` (float32) result from float16/bfloat16 operands. On CUDA one tensor-core
// GEMM that accumulates and writes float32 (aten::mm.dtype): no float32 copies of a and b
// (for bat's G = dy^T x, two activation-sized copies and an fp32 GEMM ~12x slower). On the CPU
// float32 copies: there is no CPU mm.dtype.
inline Tensor mm_accumulate(const Tensor& a, const Tensor& b, ScalarType acc) {
  if (a.scalar_type() == acc && b.scalar_type() == acc) return aten::mm(a, b);
  if (!on_cuda_path(a)) return aten::mm(aten::to(a, acc), aten::to(b, acc));
  if (a.is_cuda()) return aten::mm(a, b, acc);
  const ProfilerRange range("miss::cuda_stand_in::mm.dtype", {&a, &b});
  return aten::mm(aten::to(a, acc), aten::to(b, acc));
}

// y += a @ b in place on a bf16 y from bf16 a and b: one cuBLAS GEMM with beta = 1, which
// accumulates a @ b + y in float32 and rounds once into y.
inline void addmm_accumulate_(Tensor& y, const Tensor& a, const Tensor& b) {
  if (y.is_cuda()) {
    aten::addmm_(y, a, b);
    return;
  }
  const ProfilerRange range("miss::cuda_stand_in::addmm_", {&y, &a, &b});
  Tensor y32 = aten::to(y, kFloat, /*copy=*/true);
  aten::addmm_(y32, aten::to(a, kFloat), aten::to(b, kFloat));
  aten::copy_(y, y32);
}

// out = (bias +) a @ b, out of a's 16-bit dtype: one cuBLAS GEMM that accumulates in float32
// and rounds once on store (bias added in its epilogue).
inline void mm_into_low_precision(Tensor& out, const OptTensor& bias, const Tensor& a, const Tensor& b) {
  if (out.is_cuda()) {
    if (defined(bias)) {
      aten::addmm_out(out, *bias, a, b);
    } else {
      aten::mm_out(out, a, b);
    }
    return;
  }
  const ProfilerRange range("miss::cuda_stand_in::mm", {&a, &b});
  Tensor result = aten::mm(aten::to(a, kFloat), aten::to(b, kFloat));
  if (defined(bias)) aten::add_(result, aten::to(*bias, kFloat));
  aten::copy_(out, result);
}

// Whether the thin GEMMs of a shard op over `data` ([N, *] activations or gradients) run on
// bf16 pieces (see the top of this file). Not for float16: its exponent range would flush
// the small pieces of a float32 value to zero and overflow on large folds.
inline bool thin_gemms_on_pieces(const Tensor& data) {
  return on_cuda_path(data) && data.scalar_type() == kBFloat16;
}

// The bf16 pieces of a float32 [rows, cols] t, slot s holding piece pieces[s]: side by side
// along dim 0 ([slots * rows, cols]) or dim 1 ([rows, slots * cols]). One kernel launch.
inline Tensor bf16_pieces_of(const Tensor& t, std::initializer_list<int> pieces, int64_t dim) {
  PiecePattern pattern{static_cast<int>(pieces.size()), {0, 0, 0, 0}};
  int slot = 0;
  for (int piece : pieces) pattern.piece[slot++] = piece;
  const int64_t rows = t.size(0), cols = t.size(1), slots = pattern.slots;
  const std::vector<int64_t> shape = dim == 0 ? std::vector<int64_t>{slots * rows, cols} : std::vector<int64_t>{rows, slots * cols};
  Tensor out = aten::empty(shape, kBFloat16, t.device());
  const Tensor src = aten::contiguous(t);
  MISS_CHECK(on_cuda_path(src), "miss: bf16_pieces_of runs on the CUDA path only");
  MISS_CALL_CUDA_ONLY(bf16_pieces, src, pattern, dim == 0, out);
  return out;
}

}  // namespace miss
