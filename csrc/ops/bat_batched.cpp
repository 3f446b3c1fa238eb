// The BAT tile products as batched GEMMs (bat_batched.h), on every device. Viewed as
// W3 = W.view(out / r, in, r), row-block k of W is the [in, r] matrix whose row a * (in / r) + j is row a of tile (k, j), so that
//   W'_kj = W_kj B_k + W_kj + B_k   is   W3[k] @ B_k + W3[k] + (B_k[a] on rows a * (in/r) + j)
// and every tile of a row-block is one batch entry. Low-precision weights are widened to the
// accumulation dtype first (a transient copy): the products then run in float32 with one
// rounding on store, as on the CPU before. On CUDA that makes them float32 (SIMT) GEMMs of
// 2 * out * in * r FLOPs; benchmarks/gpu_cost_model.py prices them.
#include "bat_batched.h"

#include "../aten_calls.h"
#include "../kernels.h"

namespace miss {
namespace bat_batched {
namespace {

// [out, in] -> [out / r, in, r] in dtype: a view of w when it already has that dtype and
// layout, unless `copy` asks for a tensor of its own.
Tensor row_blocks(const Tensor& w, int64_t r, ScalarType dtype, bool copy = false) {
  const Tensor converted = aten::to(w, dtype, copy);
  return aten::view(aten::contiguous(converted), {w.size(0) / r, w.size(1), r});
}

// t3 [K, in, r] += sign * B_k[a] on every row a * (in / r) + j of block k: one pass, in place
// (a broadcast add through the stable ABI would need a weight-sized temporary).
void add_block_rows_(Tensor& t3, const Tensor& block, double sign = 1.0) {
  MISS_ROUTE(t3, add_block_rows, t3, block, sign);
}

}  // namespace

void transform(const Tensor& weight, const Tensor& block_acc, Tensor& out) {
  if (weight.numel() == 0) return;
  const int64_t r = block_acc.size(-1);
  // A 16-bit W on CUDA: one kernel reads each tile once and writes W' in W's dtype, instead of
  // float32 copies of W and W' around a float32 (SIMT) batched GEMM.
  const ScalarType t = weight.scalar_type();
  if (on_cuda_path(weight) && (t == kBFloat16 || t == kHalf) && out.scalar_type() == t && bat_transform_fits(r)) {
    MISS_CALL_CUDA_ONLY(bat_transform, weight, block_acc, out);
    return;
  }
  const Tensor w3 = row_blocks(weight, r, block_acc.scalar_type());
  // Straight into out when it has the accumulation dtype and is not W itself (an in-place
  // merge): no weight-sized temporary and no copy of it.
  if (out.scalar_type() == block_acc.scalar_type() && out.is_contiguous() && out.const_data_ptr() != w3.const_data_ptr()) {
    Tensor out3 = aten::view(out, w3.sizes());
    aten::baddbmm_out(out3, w3, w3, block_acc);
    add_block_rows_(out3, block_acc);
    return;
  }
  Tensor result = aten::baddbmm(w3, w3, block_acc);
  add_block_rows_(result, block_acc);
  aten::copy_(out, aten::view(result, weight.sizes()));
}

void block_grad(const Tensor& grad_weight, const Tensor& weight, Tensor& grad_block, bool accumulate) {
  if (grad_block.numel() == 0) return;
  const int64_t r = grad_block.size(-1), k = grad_block.size(0);
  if (on_cuda_path(weight)) {  // a bf16 W on tensor cores, without a float32 copy of it
    int64_t groups = 1;
    MISS_CALL_CUDA_ONLY(bat_block_grad_groups, weight, r, groups);
    // Several groups: one partial dB per group of each row-block's tiles, then their sum (more
    // blocks than out / r row-blocks, with no atomics: the same sums in the same order every run).
    const bool partial = groups > 1;
    Tensor sums = partial ? aten::empty({groups, k, r, r}, grad_block.scalar_type(), grad_block.device()) : grad_block;
    bool ran = false;
    MISS_CALL_CUDA_ONLY(bat_block_grad_mma, grad_weight, weight, sums, accumulate && !partial, ran);
    if (ran) {
      if (partial && accumulate) {
        aten::add_(grad_block, aten::sum(sums, std::vector<int64_t>{0}));
      } else if (partial) {
        aten::sum_out(grad_block, sums, std::vector<int64_t>{0});
      }
      return;
    }
  }
  const Tensor w3 = row_blocks(weight, r, grad_block.scalar_type());
  const Tensor g3 = row_blocks(grad_weight, r, grad_block.scalar_type());
  // sum_j W_kj^T G_kj is one [r, in] x [in, r] product per block, and sum_j G_kj (a
  // reduction) the C of that batched GEMM: one baddbmm, no separate add.
  Tensor tile_sums = aten::sum(aten::view(g3, {k, r, g3.size(1) / r, r}), std::vector<int64_t>{2});
  if (accumulate) tile_sums = aten::add(tile_sums, grad_block);
  aten::baddbmm_out(grad_block, tile_sums, aten::transpose(w3, 1, 2), g3);
}

void weight_grad(const Tensor& grad_weight, const Tensor& block_acc, Tensor& out) {
  if (grad_weight.numel() == 0) return;
  const Tensor g3 = row_blocks(grad_weight, block_acc.size(-1), block_acc.scalar_type());
  aten::copy_(out, aten::view(aten::baddbmm(g3, g3, aten::transpose(block_acc, 1, 2)), grad_weight.sizes()));
}

void unmerge(Tensor& weight, const Tensor& block_acc, const Tensor& inverse) {
  if (weight.numel() == 0) return;
  // float64 here: the inverse amplifies rounding by cond(I + B_k), and unmerge must return
  // W within rounding of what was merged.
  Tensor shifted = row_blocks(weight, block_acc.size(-1), kDouble, /*copy=*/true);
  add_block_rows_(shifted, aten::contiguous(aten::to(block_acc, kDouble)), -1.0);
  aten::copy_(weight, aten::view(aten::bmm(shifted, inverse), weight.sizes()));
}

}  // namespace bat_batched
}  // namespace miss
