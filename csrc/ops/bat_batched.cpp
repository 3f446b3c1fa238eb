// The BAT tile products as batched GEMMs (bat_batched.h), on every device. Viewed as
// W3 = W.view(out / r, in, r), row-block k of W is the [in, r] matrix whose row a * (in / r) + j is row a of tile (k, j), so that
//   W'_kj = W_kj B_k + W_kj + B_k   is   W3[k] @ B_k + W3[k] + (B_k[a] on rows a * (in/r) + j)
// and every tile of a row-block is one batch entry. Low-precision weights are widened to the
// accumulation dtype first (a transient copy): the products then run in float32 with one
// rounding on store, as on the CPU before. On CUDA that makes them float32 (SIMT) GEMMs of
// 2 * out * in * r FLOPs; benchmarks/gpu_cost_model.py prices them.
#include "bat_batched.h"

namespace miss {
namespace bat_batched {
namespace {

// [out, in] -> [out / r, in, r] in dtype: a view of w when it already has that dtype and
// layout, unless `copy` asks for a tensor of its own.
at::Tensor row_blocks(const at::Tensor& w, int64_t r, at::ScalarType dtype, bool copy = false) {
  return w.to(dtype, /*non_blocking=*/false, copy).contiguous().view({w.size(0) / r, w.size(1), r});
}

// t3 [K, in, r] += B_k[a] on every row a * (in / r) + j of block k.
void add_block_rows_(at::Tensor& t3, const at::Tensor& block) {
  const int64_t k = block.size(0), r = block.size(1);
  t3.view({k, r, t3.size(1) / r, r}).add_(block.view({k, r, 1, r}));
}

}  // namespace

void transform(const at::Tensor& weight, const at::Tensor& block_acc, at::Tensor& out) {
  if (weight.numel() == 0) return;
  const int64_t r = block_acc.size(-1);
  const at::Tensor w3 = row_blocks(weight, r, block_acc.scalar_type());
  // Straight into out when it has the accumulation dtype and is not W itself (an in-place
  // merge): no weight-sized temporary and no copy of it.
  if (out.scalar_type() == block_acc.scalar_type() && out.is_contiguous() && out.data_ptr() != w3.data_ptr()) {
    at::Tensor out3 = out.view(w3.sizes());
    at::baddbmm_out(out3, w3, w3, block_acc);
    add_block_rows_(out3, block_acc);
    return;
  }
  at::Tensor result = at::baddbmm(w3, w3, block_acc);
  add_block_rows_(result, block_acc);
  out.copy_(result.view(weight.sizes()));
}

void block_grad(const at::Tensor& grad_weight, const at::Tensor& weight, at::Tensor& grad_block) {
  if (grad_block.numel() == 0) return;
  const int64_t r = grad_block.size(-1), k = grad_block.size(0);
  const at::Tensor w3 = row_blocks(weight, r, grad_block.scalar_type());
  const at::Tensor g3 = row_blocks(grad_weight, r, grad_block.scalar_type());
  // sum_j W_kj^T G_kj is one [r, in] x [in, r] product per block; sum_j G_kj a reduction.
  at::bmm_out(grad_block, w3.transpose(1, 2), g3);
  grad_block.add_(g3.view({k, r, g3.size(1) / r, r}).sum(2));
}

void weight_grad(const at::Tensor& grad_weight, const at::Tensor& block_acc, at::Tensor& out) {
  if (grad_weight.numel() == 0) return;
  const at::Tensor g3 = row_blocks(grad_weight, block_acc.size(-1), block_acc.scalar_type());
  out.copy_(at::baddbmm(g3, g3, block_acc.transpose(1, 2)).view(grad_weight.sizes()));
}

void unmerge(at::Tensor& weight, const at::Tensor& block_acc, const at::Tensor& inverse) {
  if (weight.numel() == 0) return;
  // float64 here: the inverse amplifies rounding by cond(I + B_k), and unmerge must return
  // W within rounding of what was merged.
  at::Tensor shifted = row_blocks(weight, block_acc.size(-1), at::kDouble, /*copy=*/true);
  add_block_rows_(shifted, -block_acc.to(at::kDouble));
  weight.copy_(at::bmm(shifted, inverse).view(weight.sizes()));
}

}  // namespace bat_batched
}  // namespace miss
