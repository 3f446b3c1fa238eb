// Standard and mini MiSS ops (the "activation path" of DESIGN.md): the base GEMMs run in
// ATen, the fold / tile / out-tiled add run in our kernels, and the only tensor kept for
// backward is the fold, [N, r] float32. A [r, m] block with m == out is standard; m < out is
// mini, whose full [r, out] block (PEFT's B.repeat) is never built. "float32" below means
// the accumulation dtype (checks.h accumulate_dtype): float64 for float64 data.
#include <c10/core/DeviceGuard.h>

#include "../checks.h"
#include "../kernels.h"
#include "../tensor_views.h"
#include "gemm.h"
#include "ops.h"

namespace miss {
namespace {

// Rows handled at once when a float32 temporary of [rows, width] must be built from a
// float16/bfloat16 tensor. On the CPU ~4 MiB (the temporary stays in cache, whatever N is);
// on CUDA all rows: each chunk costs a GEMM launch and a kernel launch (~5-10 us of host
// time each), and 4 MiB chunks would turn one layer step into hundreds of launches.
// `data` is the [rows, *] tensor the chunks are cut from.
int64_t chunk_rows(const at::Tensor& data, int64_t width) {
  if (on_cuda_path(data)) return std::max<int64_t>(1, data.size(0));
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, width));
}

// t converted to the accumulation dtype of `data` (t is small: a block or [N, r]).
at::Tensor as_accumulate(const at::Tensor& t, const at::Tensor& data) {
  return t.to(accumulate_dtype(data.scalar_type())).contiguous();
}

at::Tensor fold_of(const at::Tensor& x, int64_t r, const DropoutParams& dropout) {
  at::Tensor fold = at::empty({num_rows(x), r}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  MISS_ROUTE(x, shard_fold, x, dropout, fold);
  return fold;
}

// y[n, o] += (fold @ block)[n, o % m], in place on a contiguous [N, out] y.
void add_shard_delta_(at::Tensor& y2d, const at::Tensor& fold, const at::Tensor& block_acc) {
  const int64_t rows = y2d.size(0), out = y2d.size(1), m = block_acc.size(1);
  if (rows == 0) return;
  if (m == out && y2d.scalar_type() == block_acc.scalar_type()) {
    y2d.addmm_(fold, block_acc);  // one GEMM accumulating into y, no temporary
    return;
  }
  if (m == out && thin_gemms_on_pieces(y2d)) {
    // f @ B as hi(f) hi(B) + hi(f) lo(B) + lo(f) hi(B): the three products side by side along
    // the contraction, one tensor-core GEMM into y (16 significand bits of each factor; the
    // dropped lo lo term is 2^-16 relative, far below y's bf16 rounding).
    addmm_accumulate_(y2d, bf16_pieces_of(fold, {0, 0, 1}, 1), bf16_pieces_of(block_acc, {0, 1, 0}, 0));
    return;
  }
  const int64_t step = chunk_rows(y2d, m);
  for (int64_t first = 0; first < rows; first += step) {
    const int64_t count = std::min(step, rows - first);
    at::Tensor y_chunk = y2d.narrow(0, first, count);
    const at::Tensor v = at::mm(fold.narrow(0, first, count), block_acc);
    MISS_ROUTE(y2d, add_out_tiled, y_chunk, v);
  }
}

// The [..., in] data an op folds or tiles, named `name`, and its dropout arguments.
// The "weight path" of DESIGN.md: W' = W + dW costs one pass over W, after which the forward
// and the dx GEMM are exactly the base GEMMs; it replaces the thin GEMMs f @ B and dy @ B^T and
// a pass over y and over dx. Taken only where its numerics match the activation path's and it
// is cheaper:
// - float32/float64 weights: rounding W + dW to bf16/fp16 would lose small updates;
// - no dropout: a masked x does not go through W';
// - enough rows: the two passes over W cost ~in * out whatever N, while the thin GEMMs f @ B and
//   dy @ B^T and the tile-add they replace cost ~N * r * out, so the weight path pays from
//   N * r >= K * in on. K = 19 is the crossover benchmarks/cost_breakdown.py measured on CPU
//   (2-core EPYC, fp32, in=out=2048, r=64: ~610 rows; benchmarks/results/cost_breakdown_*);
//   it has not been measured on a GPU.
constexpr int64_t kWeightPathCrossover = 19;

bool use_weight_path(const at::Tensor& weight, int64_t rows, int64_t r, double p) {
  const at::ScalarType t = weight.scalar_type();
  return p == 0.0 && (t == at::kFloat || t == at::kDouble) && rows * r >= kWeightPathCrossover * weight.size(1);
}

// W + dW (the merged weight), in W's dtype; W is not changed.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& block) {
  const at::Tensor w = weight.contiguous();
  at::Tensor result = at::empty_like(w);
  MISS_ROUTE(w, shard_merge, w, as_accumulate(block, w), 1.0f, result);
  return result;
}

// grad_x for a delta-only backward, whose width only in_features gives: an in_features no
// memory can hold is reported as that argument, not as a bare allocator failure.
at::Tensor empty_grad_x(const char* op, int64_t rows, int64_t in_features, const at::Tensor& like) {
  try {
    return at::empty({rows, in_features}, like.options());
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "miss.", op, ": cannot allocate grad_x of shape [", rows, ", ", in_features,
                "] for argument 'in_features' (", in_features, "): ", error.what_without_backtrace());
  }
}

void check_fold_inputs(const char* op, const char* name, const at::Tensor& x, double p,
                       const OptTensor& seed) {
  check_float_tensor(op, name, x);
  check_min_dim(op, name, x, 1);
  check_probability(op, p);
  check_seed(op, p, seed, x);
}

}  // namespace

at::Tensor shard_fold(const at::Tensor& x, int64_t r, double p, const OptTensor& seed) {
  const char* op = "shard_fold";
  check_fold_inputs(op, "x", x, p, seed);
  check_rank_in_range(op, "r", r, x.size(-1), "in_features");
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  return fold_of(x, r, make_dropout_params(p, seed, x));
}

at::Tensor shard_tile_add(const at::Tensor& grad_x, const at::Tensor& g, double p,
                          const OptTensor& seed) {
  const char* op = "shard_tile_add";
  check_fold_inputs(op, "grad_x", grad_x, p, seed);
  check_float_tensor(op, "g", g);
  check_same_device(op, "g", g, "grad_x", grad_x);
  check_dim(op, "g", g, 2);
  check_size(op, "g", g, 0, num_rows(grad_x), "rows of grad_x");
  check_rank_in_range(op, "g.size(1) (r)", g.size(1), grad_x.size(-1), "in_features");
  const c10::OptionalDeviceGuard guard(at::device_of(grad_x));
  at::Tensor result = grad_x.clone(at::MemoryFormat::Contiguous);
  at::Tensor rows = result.view({num_rows(grad_x), grad_x.size(-1)});
  MISS_ROUTE(grad_x, shard_tile, rows, as_accumulate(g, grad_x), make_dropout_params(p, seed, grad_x), true);
  return result;
}

std::tuple<at::Tensor, at::Tensor> shard_linear(const at::Tensor& x, const at::Tensor& weight,
                                                const OptTensor& bias, const at::Tensor& block,
                                                double p, const OptTensor& seed) {
  const char* op = "shard_linear";
  check_fold_inputs(op, "x", x, p, seed);
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_same_device(op, "weight", weight, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  const int64_t in = weight.size(1), out = weight.size(0);
  check_size(op, "x", x, x.dim() - 1, in, "in_features of weight");
  if (bias.has_value() && bias->defined()) {
    check_dim(op, "bias", *bias, 1);
    check_size(op, "bias", *bias, 0, out, "out_features");
    check_same_device(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "weight", weight);
  }
  check_shard_block(op, block, in, out);
  check_same_device(op, "block", block, "x", x);
  const c10::OptionalDeviceGuard guard(at::device_of(x));

  const at::Tensor fold = fold_of(x, block.size(0), make_dropout_params(p, seed, x));
  if (use_weight_path(weight, num_rows(x), block.size(0), p)) {
    return {at::linear(x, merged_weight(weight, block), bias), fold};
  }
  // This op owns y, so the delta is accumulated into it in place: no second [N, out] pass.
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  at::Tensor y2d = y.view({num_rows(x), out});
  add_shard_delta_(y2d, fold, as_accumulate(block, x));
  return {y, fold};
}

std::tuple<at::Tensor, at::Tensor> shard_delta_add(const at::Tensor& y, const at::Tensor& x,
                                                   const at::Tensor& block, double p,
                                                   const OptTensor& seed) {
  const char* op = "shard_delta_add";
  check_fold_inputs(op, "x", x, p, seed);
  check_float_tensor(op, "y", y);
  check_same_device(op, "y", y, "x", x);
  TORCH_CHECK(y.dim() == x.dim() && y.sizes().slice(0, y.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "miss.", op, ": argument 'y' must have the leading dims of 'x' ", x.sizes(), ", got ",
              y.sizes());
  check_shard_block(op, block, x.size(-1), y.size(-1));
  check_same_device(op, "block", block, "x", x);
  const c10::OptionalDeviceGuard guard(at::device_of(x));

  const at::Tensor fold = fold_of(x, block.size(0), make_dropout_params(p, seed, x));
  at::Tensor result = y.clone(at::MemoryFormat::Contiguous);
  at::Tensor result2d = result.view({num_rows(y), y.size(-1)});
  add_shard_delta_(result2d, fold, as_accumulate(block, y));
  return {result, fold};
}

std::tuple<at::Tensor, at::Tensor> shard_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& fold, const OptTensor& weight,
    const at::Tensor& block, int64_t in_features, double p, const OptTensor& seed,
    const OptTensor& grad_fold, std::array<bool, 2> output_mask) {
  const char* op = "shard_linear_backward";
  check_fold_inputs(op, "grad_out", grad_out, p, seed);
  const int64_t rows = num_rows(grad_out), out = grad_out.size(-1);
  check_shard_block(op, block, in_features, out);
  check_same_device(op, "block", block, "grad_out", grad_out);
  const int64_t r = block.size(0), m = block.size(1);
  check_float_tensor(op, "fold", fold);
  check_same_device(op, "fold", fold, "grad_out", grad_out);
  check_dim(op, "fold", fold, 2);
  check_size(op, "fold", fold, 0, rows, "rows of grad_out");
  check_size(op, "fold", fold, 1, r, "r of block");
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) {
    check_dim(op, "weight", *weight, 2);
    check_size(op, "weight", *weight, 0, out, "out_features");
    check_size(op, "weight", *weight, 1, in_features, "in_features");
    check_same_device(op, "weight", *weight, "grad_out", grad_out);
    check_same_dtype(op, "weight", *weight, "grad_out", grad_out);
  }
  const bool has_grad_fold = grad_fold.has_value() && grad_fold->defined();
  if (has_grad_fold) {
    check_float_tensor(op, "grad_fold", *grad_fold);
    check_same_device(op, "grad_fold", *grad_fold, "grad_out", grad_out);
    TORCH_CHECK(grad_fold->sizes() == fold.sizes(), "miss.", op,
                ": argument 'grad_fold' must have the shape of 'fold' ", fold.sizes(), ", got ",
                grad_fold->sizes());
  }
  const c10::OptionalDeviceGuard guard(at::device_of(grad_out));
  const bool need_x = output_mask[0], need_block = output_mask[1];
  // With the weight path, dx = dy @ W' needs no g = dy @ B^T.
  const bool weight_path = has_weight && use_weight_path(*weight, rows, r, p);
  const bool need_g = need_x && !weight_path;
  const at::ScalarType acc = accumulate_dtype(grad_out.scalar_type());
  const at::Tensor block_acc = as_accumulate(block, grad_out);
  const at::Tensor fold_acc = fold.to(acc);
  const at::Tensor dy = grad_out.reshape({rows, out});

  // g = h @ B^T (for the tile into grad_x) and dB = fold^T @ h, with h = dy folded along out
  // to [N, m] (mini) or dy itself (standard), always in the accumulation dtype.
  at::Tensor g = need_g ? at::empty({rows, r}, fold_acc.options()) : at::Tensor();
  const bool on_pieces = m == out && thin_gemms_on_pieces(dy);
  at::Tensor grad_block_acc;  // accumulated into by the float32 paths, written by the pieces one
  if (need_block) grad_block_acc = on_pieces ? at::empty({r, m}, fold_acc.options()) : at::zeros({r, m}, fold_acc.options());
  if (on_pieces) {
    // Tensor cores, dy read as it is (gemm.h): g from two pieces of B (g goes into a bf16 dx),
    // dB from three pieces of f (dB is float32: all 24 bits). Each GEMM writes the piece
    // products side by side; a small add sums them.
    if (need_g) {
      const at::Tensor parts = mm_accumulate(dy, bf16_pieces_of(block_acc, {0, 1}, 0).t(), acc);
      at::add_out(g, parts.narrow(1, 0, r), parts.narrow(1, r, r));
    }
    if (need_block) {
      const at::Tensor parts = mm_accumulate(bf16_pieces_of(fold_acc, {0, 1, 2}, 1).t(), dy, acc);
      at::sum_out(grad_block_acc, parts.view({3, r, m}), 0);
    }
  } else if (m < out || dy.scalar_type() == acc) {
    at::Tensor h = dy;
    if (m < out) {
      h = at::empty({rows, m}, fold_acc.options());
      MISS_ROUTE(dy, shard_fold, dy, DropoutParams{}, h);
    }
    if (need_g) at::mm_out(g, h, block_acc.t());
    if (need_block) grad_block_acc.addmm_(fold_acc.t(), h);
  } else {
    const int64_t step = chunk_rows(dy, out);
    for (int64_t first = 0; first < rows; first += step) {
      const int64_t count = std::min(step, rows - first);
      const at::Tensor h = dy.narrow(0, first, count).to(acc);
      if (need_g) {
        at::Tensor g_chunk = g.narrow(0, first, count);
        at::mm_out(g_chunk, h, block_acc.t());
      }
      if (need_block) grad_block_acc.addmm_(fold_acc.narrow(0, first, count).t(), h);
    }
  }

  at::Tensor grad_x = at::empty({0}, grad_out.options());
  if (need_x) {
    at::Tensor dx2d;
    if (weight_path) {
      dx2d = at::mm(dy, merged_weight(*weight, block));
      if (has_grad_fold) MISS_ROUTE(grad_out, shard_tile, dx2d, grad_fold->to(acc).contiguous(), DropoutParams{}, true);
    } else {
      if (has_grad_fold) g.add_(grad_fold->to(acc));
      dx2d = has_weight ? at::mm(dy, *weight) : empty_grad_x(op, rows, in_features, grad_out);
      MISS_ROUTE(grad_out, shard_tile, dx2d, g, make_dropout_params(p, seed, grad_out), has_weight);
    }
    std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
    shape.back() = in_features;
    grad_x = dx2d.view(shape);
  }
  at::Tensor grad_block = need_block ? grad_block_acc.to(block.scalar_type()) : at::empty({0}, block.options());
  return {grad_x, grad_block};
}

}  // namespace miss
