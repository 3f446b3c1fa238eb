// BAT ops. The adapted weight W' (W_kj + W_kj B_k + B_k per r x r tile) is built for the
// forward GEMM and rebuilt in backward rather than kept: PEFT keeps weight-sized copies for
// backward, which is where its extra memory goes. The backward needs G = dy^T x (the
// gradient with respect to W'), computed in float32. On CUDA W' and G are built a slab at a
// time (slab_lines).
#include "../aten_calls.h"
#include "../checks.h"
#include "bat_batched.h"
#include "../shard_index.h"  // ceil_div
#include "../tensor_views.h"
#include "gemm.h"
#include "ops.h"

namespace miss {
namespace {

void check_bat_layer(const char* op, const Tensor& weight, const Tensor& block) {
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_bat_block(op, block, weight.size(1), weight.size(0));
  check_same_device(op, "block", block, "weight", weight);
}

// W' whole, from W contiguous and the block in its accumulation dtype.
Tensor transformed_weight(const Tensor& w, const Tensor& block_acc) {
  Tensor result = aten::empty_contiguous_like(w);
  bat_batched::transform(w, block_acc, result);
  return result;
}

// In the accumulation dtype of weight (float32, or float64 for float64).
Tensor block_grad_of(const Tensor& grad_weight, const Tensor& weight, int64_t r) {
  const ScalarType acc = accumulate_dtype(weight.scalar_type());
  Tensor grad_block = aten::empty({weight.size(0) / r, r, r}, acc, weight.device());
  bat_batched::block_grad(as_accumulate(grad_weight, weight), aten::contiguous(weight), grad_block);
  return grad_block;
}

Tensor weight_grad_of(const Tensor& grad_weight, const Tensor& block) {
  const Tensor g = aten::contiguous(grad_weight);
  Tensor result = aten::empty_contiguous_like(g);
  bat_batched::weight_grad(g, as_accumulate(block, g), result);
  return result;
}

// Bytes of t's elements.
int64_t bytes_of(const Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// How many rows (or columns) of a weight-sized temporary a slab takes on CUDA: whole r-row (or
// r-column) blocks of at most budget_bytes, line_bytes per row (column). On the CPU all of
// them (the measured path). Two temporaries are built a slab at a time on CUDA, W' (as large
// as the weight) and G = dy^T x (float32, twice that), with budgets that keep bat's peak
// memory at that of standard plus one slab (the target is within 5%):
// - the forward's W': x's bytes. The forward holds y and W'; the backward holds y and dx
//   (x's size) and more, so a W' no larger than x never sets the step's peak.
// - G: x's bytes too, because the backward builds G (and dB from it) before it allocates dx:
//   G and its partial sums then take no more than dx and a W' slab will.
// - dx's W', built while dx is alive: 1/8 of dy's bytes.
// However few the tokens, a temporary takes at most kMaxSlabs slabs: budgets tied to x and dy
// alone would cut W' into single r blocks when decoding one token with an unmerged adapter
// (out / r launches of tiny GEMMs, the launches being the cost), and a quarter of W' or G is
// small beside the weight the layer holds.
// At the benchmark shape (N = 2 in = 2 out) the forward's W' and G are whole, and dx's W' is
// in 4 slabs of 1024 columns; each slab's GEMM is still large. The rules scale with the shape,
// so the number of slabs does not depend on the size (benchmarks/gpu_cost_model.py relies on
// it).
constexpr int64_t kMaxSlabs = 4;

int64_t slab_lines(const Tensor& x, int64_t lines, int64_t line_bytes, int64_t r, int64_t budget_bytes) {
  if (!on_cuda_path(x)) return std::max<int64_t>(lines, 1);
  const int64_t within_budget = budget_bytes / std::max<int64_t>(1, line_bytes) / r * r;
  const int64_t fewest_slabs = ceil_div(ceil_div(lines, kMaxSlabs), r) * r;
  return std::max({r, within_budget, fewest_slabs});
}

// f(first, count) for the slabs [first, first + count) of [0, lines), step lines each.
template <typename F>
void for_each_slab(int64_t lines, int64_t step, const F& f) {
  for (int64_t first = 0; first < lines; first += step) f(first, std::min(step, lines - first));
}

// y = x W'^T (+ bias), W' built a slab of rows at a time: y's columns of that slab from one GEMM.
Tensor linear_by_weight_slabs(const Tensor& x2d, const Tensor& w, const OptTensor& bias, const Tensor& block_acc) {
  const int64_t out = w.size(0), in = w.size(1), r = block_acc.size(-1);
  const int64_t step = slab_lines(x2d, out, in * static_cast<int64_t>(w.element_size()), r, bytes_of(x2d));
  Tensor y = aten::empty({x2d.size(0), out}, x2d.scalar_type(), x2d.device());
  for_each_slab(out, step, [&](int64_t first, int64_t count) {
    const Tensor w_slab = transformed_weight(aten::narrow(w, 0, first, count),
                                             aten::narrow(block_acc, 0, first / r, count / r));
    Tensor y_slab = aten::narrow(y, 1, first, count);
    if (defined(bias)) {
      aten::addmm_out(y_slab, aten::narrow(*bias, 0, first, count), x2d, aten::t(w_slab));
    } else {
      aten::mm_out(y_slab, x2d, aten::t(w_slab));
    }
  });
  return y;
}

// dx = dy W', W' built a slab of columns at a time: dx's columns of that slab from one GEMM.
Tensor grad_x_by_weight_slabs(const Tensor& dy, const Tensor& w, const Tensor& block_acc) {
  const int64_t out = w.size(0), in = w.size(1), r = block_acc.size(-1);
  const int64_t step = slab_lines(dy, in, out * static_cast<int64_t>(w.element_size()), r, bytes_of(dy) / 8);
  Tensor dx = aten::empty({dy.size(0), in}, dy.scalar_type(), dy.device());
  for_each_slab(in, step, [&](int64_t first, int64_t count) {
    Tensor dx_slab = aten::narrow(dx, 1, first, count);
    aten::mm_out(dx_slab, dy, transformed_weight(aten::narrow(w, 1, first, count), block_acc));
  });
  return dx;
}

void check_x_for_weight(const char* op, const Tensor& x, const Tensor& weight) {
  check_float_tensor(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_same_device(op, "x", x, "weight", weight);
  check_same_dtype(op, "x", x, "weight", weight);
  check_size(op, "x", x, x.dim() - 1, weight.size(1), "in_features of weight");
}

}  // namespace

Tensor bat_weight(const Tensor& weight, const Tensor& block) {
  check_bat_layer("bat_weight", weight, block);
  const OptionalDeviceGuard guard(weight);
  return transformed_weight(aten::contiguous(weight), as_accumulate(block, weight));
}

Tensor bat_block_grad(const Tensor& grad_weight, const Tensor& weight, int64_t r) {
  const char* op = "bat_block_grad";
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_float_tensor(op, "grad_weight", grad_weight);
  check_same_device(op, "grad_weight", grad_weight, "weight", weight);
  MISS_CHECK(grad_weight.sizes().equals(weight.sizes()), "miss.", op,
              ": argument 'grad_weight' must have the shape of 'weight' ", weight.sizes(), ", got ",
              grad_weight.sizes());
  MISS_CHECK(r >= 1 && weight.size(0) % r == 0 && weight.size(1) % r == 0, "miss.", op,
              ": argument 'r' (", r, ") must divide in_features (", weight.size(1),
              ") and out_features (", weight.size(0), ")");
  const OptionalDeviceGuard guard(weight);
  return block_grad_of(grad_weight, weight, r);
}

Tensor bat_weight_grad(const Tensor& grad_weight, const Tensor& block) {
  const char* op = "bat_weight_grad";
  check_float_tensor(op, "grad_weight", grad_weight);
  check_dim(op, "grad_weight", grad_weight, 2);
  check_bat_block(op, block, grad_weight.size(1), grad_weight.size(0));
  check_same_device(op, "block", block, "grad_weight", grad_weight);
  const OptionalDeviceGuard guard(grad_weight);
  return weight_grad_of(grad_weight, block);
}

Tensor bat_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                  const Tensor& block) {
  const char* op = "bat_linear";
  check_bat_layer(op, weight, block);
  check_x_for_weight(op, x, weight);
  if (defined(bias)) {
    check_dim(op, "bias", *bias, 1);
    check_size(op, "bias", *bias, 0, weight.size(0), "out_features");
    check_same_device(op, "bias", *bias, "weight", weight);
    check_same_dtype(op, "bias", *bias, "weight", weight);
  }
  const OptionalDeviceGuard guard(x);
  const Tensor w = aten::contiguous(weight), block_acc = as_accumulate(block, w);
  if (!on_cuda_path(x)) return aten::linear(x, transformed_weight(w, block_acc), bias);
  const Tensor x2d = aten::reshape(x, {num_rows(x), weight.size(1)});
  std::vector<int64_t> y_sizes(x.sizes().begin(), x.sizes().end());
  y_sizes.back() = weight.size(0);
  return aten::view(linear_by_weight_slabs(x2d, w, bias, block_acc), y_sizes);
}

std::tuple<Tensor, Tensor, Tensor> bat_linear_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const Tensor& block, std::vector<bool> output_mask) {
  const char* op = "bat_linear_backward";
  check_bat_layer(op, weight, block);
  check_x_for_weight(op, x, weight);
  check_float_tensor(op, "grad_out", grad_out);
  check_same_device(op, "grad_out", grad_out, "weight", weight);
  check_same_dtype(op, "grad_out", grad_out, "weight", weight);
  MISS_CHECK(grad_out.dim() == x.dim() &&
                  grad_out.sizes().slice(0, x.dim() - 1).equals(x.sizes().slice(0, x.dim() - 1)) &&
                  grad_out.size(-1) == weight.size(0),
              "miss.", op, ": argument 'grad_out' must have shape x.shape[:-1] + [out_features=",
              weight.size(0), "], got ", grad_out.sizes());
  const OptionalDeviceGuard guard(x);
  const bool need_x = output_mask[0], need_weight = output_mask[1], need_block = output_mask[2];
  const int64_t rows = num_rows(x), in = weight.size(1), out = weight.size(0);
  const Tensor dy = aten::reshape(grad_out, {rows, out});
  // Once for the whole backward: W contiguous, and the block in the accumulation dtype (for
  // W', and for dW).
  const Tensor w = aten::contiguous(weight);
  const Tensor block_acc = need_x || need_weight ? as_accumulate(block, w) : Tensor();

  // G and dB first: dx does not exist yet, so G's slabs may be as large as dx (slab_lines).
  Tensor grad_weight = aten::empty({0}, weight.scalar_type(), weight.device());
  Tensor grad_block = aten::empty({0}, block.scalar_type(), block.device());
  if (need_weight || need_block) {
    // G in float32 (float64 for float64): dB sums r * in / r products of G with W, and G
    // rounded to bf16 would carry a 2^-9 relative error into every one of them. The operands
    // stay in their dtype where the device can (mm_accumulate).
    const ScalarType acc = accumulate_dtype(x.scalar_type());
    const Tensor x2d = aten::reshape(x, {rows, in});
    const Tensor dy_t = aten::t(dy);
    const int64_t r = block.size(-1);
    const int64_t step = slab_lines(x, in, out * static_cast<int64_t>(sizeof(float)), r, bytes_of(x));
    if (need_block) grad_block = aten::empty({out / r, r, r}, acc, block.device());
    if (need_weight) grad_weight = aten::empty_contiguous_like(w);
    // G a slab of whole r-column blocks at a time: dB_k sums over the tiles of every slab.
    for_each_slab(in, step, [&](int64_t first, int64_t count) {
      const Tensor g = mm_accumulate(dy_t, aten::narrow(x2d, 1, first, count), acc);
      if (need_block) bat_batched::block_grad(g, aten::narrow(w, 1, first, count), grad_block, first > 0);
      if (need_weight) {  // written straight into its columns of grad_weight, in W's dtype
        Tensor slab = aten::narrow(grad_weight, 1, first, count);
        bat_batched::weight_grad(g, block_acc, slab);
      }
    });
    if (need_block) grad_block = aten::to(grad_block, block.scalar_type());
  }

  Tensor grad_x = aten::empty({0}, x.scalar_type(), x.device());
  if (need_x) {
    const Tensor dx = on_cuda_path(x) ? grad_x_by_weight_slabs(dy, w, block_acc)
                                      : aten::mm(dy, transformed_weight(w, block_acc));
    grad_x = aten::view(dx, x.sizes());
  }
  return {grad_x, grad_weight, grad_block};
}

}  // namespace miss
