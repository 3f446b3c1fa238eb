// Standard and mini MiSS ops (the "activation path" of DESIGN.md): the base GEMMs run in
// ATen, the fold / tile / out-tiled add run in our kernels, and the only tensor kept for
// backward is the fold, [N, r] float32. A [r, m] block with m == out is standard; m < out is
// mini, whose full [r, out] block (PEFT's B.repeat) is never built. "float32" below means
// the accumulation dtype (checks.h accumulate_dtype): float64 for float64 data.
#include "../aten_calls.h"
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
int64_t chunk_rows(const Tensor& data, int64_t width) {
  if (on_cuda_path(data)) return std::max<int64_t>(1, data.size(0));
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, width));
}

Tensor fold_of(const Tensor& x, int64_t r, const DropoutParams& dropout) {
  Tensor fold = aten::empty({num_rows(x), r}, accumulate_dtype(x.scalar_type()), x.device());
  MISS_ROUTE(x, shard_fold, x, dropout, fold);
  return fold;
}

// y[n, o] += (fold @ block)[n, o % m], in place on a contiguous [N, out] y.
void add_shard_delta_(Tensor& y2d, const Tensor& fold, const Tensor& block_acc) {
  const int64_t rows = y2d.size(0), out = y2d.size(1), m = block_acc.size(1);
  if (rows == 0) return;
  if (m == out && y2d.scalar_type() == block_acc.scalar_type()) {
    aten::addmm_(y2d, fold, block_acc);  // one GEMM accumulating into y, no temporary
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
    Tensor y_chunk = aten::narrow(y2d, 0, first, count);
    const Tensor v = aten::mm(aten::narrow(fold, 0, first, count), block_acc);
    MISS_ROUTE(y2d, add_out_tiled, y_chunk, v);
  }
}

// Whether the base GEMM of a layer op over 16-bit `data` on CUDA accumulates into the
// MiSS term instead of the other way round: the delta (y) or the tile of g (dx) is written
// first, one write-only pass, and then cuBLAS adds x W^T (dy W) to it with beta = 1, reading
// it under the GEMM's compute, instead of a read-and-write pass over y (dx) after the GEMM.
// Both orders round twice (the MiSS term to the data's dtype, the sum once more). The CPU
// keeps the other order: its GEMMs read C at the price of memory, not for free.
bool base_gemm_accumulates(const Tensor& data) {
  const ScalarType t = data.scalar_type();
  return on_cuda_path(data) && (t == kBFloat16 || t == kHalf);
}

// y2d = bias + (fold @ block)[n, o % m], written (y2d's old values unused): tensor cores on
// bf16 pieces for standard, else the thin GEMM in float32 and a write-only tiling kernel.
void write_shard_delta(Tensor& y2d, const Tensor& fold, const Tensor& block_acc, const OptTensor& bias) {
  const int64_t m = block_acc.size(1);
  if (y2d.size(0) == 0) return;
  if (m == y2d.size(1) && thin_gemms_on_pieces(y2d)) {
    mm_into_low_precision(y2d, bias, bf16_pieces_of(fold, {0, 0, 1}, 1), bf16_pieces_of(block_acc, {0, 1, 0}, 0));
    return;
  }
  const Tensor v = aten::mm(fold, block_acc);
  MISS_CALL_CUDA_ONLY(write_out_tiled, y2d, v, bias);
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

bool use_weight_path(const Tensor& weight, int64_t rows, int64_t r, double p) {
  const ScalarType t = weight.scalar_type();
  return p == 0.0 && (t == kFloat || t == kDouble) && rows * r >= kWeightPathCrossover * weight.size(1);
}

// W + dW (the merged weight), in W's dtype; W is not changed.
Tensor merged_weight(const Tensor& weight, const Tensor& block) {
  const Tensor w = aten::contiguous(weight);
  Tensor result = aten::empty_contiguous_like(w);
  MISS_ROUTE(w, shard_merge, w, as_accumulate(block, w), 1.0f, result);
  return result;
}

// grad_x for a delta-only backward, whose width only in_features gives: an in_features no
// memory can hold is reported as that argument, not as a bare allocator failure.
Tensor empty_grad_x(const char* op, int64_t rows, int64_t in_features, const Tensor& like) {
  try {
    return aten::empty({rows, in_features}, like.scalar_type(), like.device());
  } catch (const std::exception& error) {
    // torch < 2.13 gives the stable ABI no text for an error inside libtorch (it logs it);
    // what comes back names the failed call.
    MISS_CHECK(false, "miss.", op, ": cannot allocate grad_x of shape [", rows, ", ", in_features,
               "] for argument 'in_features' (", in_features, "): ", error.what());
  }
  return Tensor();  // not reached
}

void check_fold_inputs(const char* op, const char* name, const Tensor& x, double p,
                       const OptTensor& seed) {
  check_float_tensor(op, name, x);
  check_min_dim(op, name, x, 1);
  check_probability(op, p);
  check_seed(op, p, seed, x);
}

}  // namespace

Tensor shard_fold(const Tensor& x, int64_t r, double p, const OptTensor& seed) {
  const char* op = "shard_fold";
  check_fold_inputs(op, "x", x, p, seed);
  check_rank_in_range(op, "r", r, x.size(-1), "in_features");
  const OptionalDeviceGuard guard(x);
  return fold_of(x, r, make_dropout_params(p, seed, x));
}

Tensor shard_tile_add(const Tensor& grad_x, const Tensor& g, double p,
                          const OptTensor& seed) {
  const char* op = "shard_tile_add";
  check_fold_inputs(op, "grad_x", grad_x, p, seed);
  check_float_tensor(op, "g", g);
  check_same_device(op, "g", g, "grad_x", grad_x);
  check_dim(op, "g", g, 2);
  check_size(op, "g", g, 0, num_rows(grad_x), "rows of grad_x");
  check_rank_in_range(op, "g.size(1) (r)", g.size(1), grad_x.size(-1), "in_features");
  const OptionalDeviceGuard guard(grad_x);
  Tensor result = aten::clone_contiguous(grad_x);
  Tensor rows = aten::view(result, {num_rows(grad_x), grad_x.size(-1)});
  MISS_ROUTE(grad_x, shard_tile, rows, as_accumulate(g, grad_x), make_dropout_params(p, seed, grad_x), true);
  return result;
}

std::tuple<Tensor, Tensor> shard_linear(const Tensor& x, const Tensor& weight,
                                        const OptTensor& bias, const Tensor& block,
                                                double p, const OptTensor& seed) {
  const char* op = "shard_linear";
  check_fold_inputs(op, "x", x, p, seed);
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_same_device(op, "weight", weight, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  const int64_t in = weight.size(1), out = weight.size(0);
  check_size(op, "x", x, x.dim() - 1, in, "in_features of weight");
  if (defined(bias)) {
    check_dim(op, "bias", *bias, 1);
    check_size(op, "bias", *bias, 0, out, "out_features");
    check_same_device(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "weight", weight);
  }
  check_shard_block(op, block, in, out);
  check_same_device(op, "block", block, "x", x);
  const OptionalDeviceGuard guard(x);

  const Tensor fold = fold_of(x, block.size(0), make_dropout_params(p, seed, x));
  if (use_weight_path(weight, num_rows(x), block.size(0), p)) {
    return {aten::linear(x, merged_weight(weight, block), bias), fold};
  }
  if (base_gemm_accumulates(x)) {
    const int64_t rows = num_rows(x);
    Tensor y2d = aten::empty({rows, out}, x.scalar_type(), x.device());
    write_shard_delta(y2d, fold, as_accumulate(block, x), bias);
    addmm_accumulate_(y2d, aten::reshape(x, {rows, in}), aten::t(weight));
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out;
    return {aten::view(y2d, shape), fold};
  }
  // This op owns y, so the delta is accumulated into it in place: no second [N, out] pass.
  Tensor y = aten::contiguous(aten::linear(x, weight, bias));
  Tensor y2d = aten::view(y, {num_rows(x), out});
  add_shard_delta_(y2d, fold, as_accumulate(block, x));
  return {y, fold};
}

std::tuple<Tensor, Tensor> shard_delta_add(const Tensor& y, const Tensor& x,
                                           const Tensor& block, double p,
                                                   const OptTensor& seed) {
  const char* op = "shard_delta_add";
  check_fold_inputs(op, "x", x, p, seed);
  check_float_tensor(op, "y", y);
  check_same_device(op, "y", y, "x", x);
  MISS_CHECK(y.dim() == x.dim() && y.sizes().slice(0, y.dim() - 1).equals(x.sizes().slice(0, x.dim() - 1)),
              "miss.", op, ": argument 'y' must have the leading dims of 'x' ", x.sizes(), ", got ",
              y.sizes());
  check_shard_block(op, block, x.size(-1), y.size(-1));
  check_same_device(op, "block", block, "x", x);
  const OptionalDeviceGuard guard(x);

  const Tensor fold = fold_of(x, block.size(0), make_dropout_params(p, seed, x));
  Tensor result = aten::clone_contiguous(y);
  Tensor result2d = aten::view(result, {num_rows(y), y.size(-1)});
  add_shard_delta_(result2d, fold, as_accumulate(block, y));
  return {result, fold};
}

std::tuple<Tensor, Tensor> shard_linear_backward(
    const Tensor& grad_out, const Tensor& fold, const OptTensor& weight,
    const Tensor& block, int64_t in_features, double p, const OptTensor& seed,
    const OptTensor& grad_fold, std::vector<bool> output_mask) {
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
  const bool has_weight = defined(weight);
  if (has_weight) {
    check_dim(op, "weight", *weight, 2);
    check_size(op, "weight", *weight, 0, out, "out_features");
    check_size(op, "weight", *weight, 1, in_features, "in_features");
    check_same_device(op, "weight", *weight, "grad_out", grad_out);
    check_same_dtype(op, "weight", *weight, "grad_out", grad_out);
  }
  const bool has_grad_fold = defined(grad_fold);
  if (has_grad_fold) {
    check_float_tensor(op, "grad_fold", *grad_fold);
    check_same_device(op, "grad_fold", *grad_fold, "grad_out", grad_out);
    MISS_CHECK(grad_fold->sizes().equals(fold.sizes()), "miss.", op,
                ": argument 'grad_fold' must have the shape of 'fold' ", fold.sizes(), ", got ",
                grad_fold->sizes());
  }
  const OptionalDeviceGuard guard(grad_out);
  const bool need_x = output_mask[0], need_block = output_mask[1];
  // With the weight path, dx = dy @ W' needs no g = dy @ B^T.
  const bool weight_path = has_weight && use_weight_path(*weight, rows, r, p);
  const bool need_g = need_x && !weight_path;
  const ScalarType acc = accumulate_dtype(grad_out.scalar_type());
  const Tensor block_acc = as_accumulate(block, grad_out);
  const Tensor fold_acc = aten::to(fold, acc);
  const Tensor dy = aten::reshape(grad_out, {rows, out});
  const Tensor block_acc_t = aten::t(block_acc);

  // g = h @ B^T (for the tile into grad_x) and dB = fold^T @ h, with h = dy folded along out
  // to [N, m] (mini) or dy itself (standard), always in the accumulation dtype.
  Tensor g = need_g ? aten::empty({rows, r}, acc, fold.device()) : Tensor();
  const bool on_pieces = m == out && thin_gemms_on_pieces(dy);
  Tensor grad_block_acc;  // accumulated into by the float32 paths, written by the pieces one
  if (need_block) {
    grad_block_acc = on_pieces ? aten::empty({r, m}, acc, fold.device()) : aten::zeros({r, m}, acc, fold.device());
  }
  if (on_pieces) {
    // Tensor cores, dy read as it is (gemm.h): g from two pieces of B (g goes into a bf16 dx),
    // dB from three pieces of f (dB is float32: all 24 bits). Each GEMM writes the piece
    // products side by side; a small add sums them.
    if (need_g) {
      // parts [N, 2r] holds the two products side by side: g is their sum, one rounding.
      const Tensor parts = mm_accumulate(dy, aten::t(bf16_pieces_of(block_acc, {0, 1}, 0)), acc);
      aten::sum_out(g, aten::view(parts, {rows, 2, r}), std::vector<int64_t>{1});
    }
    if (need_block) {
      const Tensor parts = mm_accumulate(aten::t(bf16_pieces_of(fold_acc, {0, 1, 2}, 1)), dy, acc);
      aten::sum_out(grad_block_acc, aten::view(parts, {3, r, m}), std::vector<int64_t>{0});
    }
  } else if (m < out || dy.scalar_type() == acc) {
    Tensor h = dy;
    if (m < out) {
      h = aten::empty({rows, m}, acc, fold.device());
      MISS_ROUTE(dy, shard_fold, dy, DropoutParams{}, h);
    }
    if (need_g) aten::mm_out(g, h, block_acc_t);
    if (need_block) aten::addmm_(grad_block_acc, aten::t(fold_acc), h);
  } else {
    const int64_t step = chunk_rows(dy, out);
    for (int64_t first = 0; first < rows; first += step) {
      const int64_t count = std::min(step, rows - first);
      const Tensor h = aten::to(aten::narrow(dy, 0, first, count), acc);
      if (need_g) {
        Tensor g_chunk = aten::narrow(g, 0, first, count);
        aten::mm_out(g_chunk, h, block_acc_t);
      }
      if (need_block) aten::addmm_(grad_block_acc, aten::t(aten::narrow(fold_acc, 0, first, count)), h);
    }
  }

  Tensor grad_x = aten::empty({0}, grad_out.scalar_type(), grad_out.device());
  if (need_x) {
    Tensor dx2d;
    if (weight_path) {
      dx2d = aten::mm(dy, merged_weight(*weight, block));
      if (has_grad_fold) MISS_ROUTE(grad_out, shard_tile, dx2d, as_accumulate(*grad_fold, grad_out), DropoutParams{}, true);
    } else {
      if (has_grad_fold) aten::add_(g, aten::to(*grad_fold, acc));
      const DropoutParams dropout = make_dropout_params(p, seed, grad_out);
      if (has_weight && base_gemm_accumulates(grad_out)) {  // the tile written, then dy W added
        dx2d = aten::empty({rows, in_features}, grad_out.scalar_type(), grad_out.device());
        MISS_ROUTE(grad_out, shard_tile, dx2d, g, dropout, false);
        addmm_accumulate_(dx2d, dy, *weight);
      } else {
        dx2d = has_weight ? aten::mm(dy, *weight) : empty_grad_x(op, rows, in_features, grad_out);
        MISS_ROUTE(grad_out, shard_tile, dx2d, g, dropout, has_weight);
      }
    }
    std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
    shape.back() = in_features;
    grad_x = aten::view(dx2d, shape);
  }
  Tensor grad_block = need_block ? aten::to(grad_block_acc, block.scalar_type())
                                 : aten::empty({0}, block.scalar_type(), block.device());
  return {grad_x, grad_block};
}

}  // namespace miss
