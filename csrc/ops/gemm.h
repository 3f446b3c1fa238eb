// GEMMs of the op bodies whose best form differs between the CPU and CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "../kernels.h"

namespace miss {

// a @ b with an `acc` (float32) result from float16/bfloat16 operands. On CUDA one tensor-core
// GEMM that accumulates and writes float32 (aten::mm.dtype): no float32 copies of a and b
// (for bat's G = dy^T x, two activation-sized copies and an fp32 GEMM ~12x slower). On the CPU
// float32 copies: there is no CPU mm.dtype, and this CPU's float32 GEMMs are ~7x faster than
// its bf16 ones. The emulated CUDA device takes the CUDA decision and computes the same math
// with the CPU's GEMM, inside a profiler range named after the call it stands in for, so a
// recorded launch sequence shows one mm.dtype.
inline at::Tensor mm_accumulate(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc && b.scalar_type() == acc) return at::mm(a, b);
  if (!on_cuda_path(a)) return at::mm(a.to(acc), b.to(acc));
  if (a.is_cuda()) return at::mm(a, b, acc);
  RECORD_FUNCTION("miss::cuda_stand_in::mm.dtype", std::vector<c10::IValue>({a, b}));
  return at::mm(a.to(acc), b.to(acc));
}

}  // namespace miss
