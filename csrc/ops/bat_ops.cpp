// BAT ops. The adapted weight W' (W_kj + W_kj B_k + B_k per r x r tile) is built for the
// forward GEMM and rebuilt in backward rather than kept: PEFT keeps weight-sized copies for
// backward, which is where its extra memory goes. The backward needs G = dy^T x (the
// gradient with respect to W'), computed in float32; on CUDA a slab of its rows at a time.
#include <c10/core/DeviceGuard.h>

#include "../checks.h"
#include "bat_batched.h"
#include "../tensor_views.h"
#include "gemm.h"
#include "ops.h"

namespace miss {
namespace {

void check_bat_layer(const char* op, const at::Tensor& weight, const at::Tensor& block) {
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_bat_block(op, block, weight.size(1), weight.size(0));
  check_same_device(op, "block", block, "weight", weight);
}

at::Tensor transformed_weight(const at::Tensor& weight, const at::Tensor& block) {
  const at::Tensor w = weight.contiguous();
  at::Tensor result = at::empty_like(w);
  bat_batched::transform(w, block.to(accumulate_dtype(w.scalar_type())).contiguous(), result);
  return result;
}

// In the accumulation dtype of weight (float32, or float64 for float64).
at::Tensor block_grad_of(const at::Tensor& grad_weight, const at::Tensor& weight, int64_t r) {
  const at::ScalarType acc = accumulate_dtype(weight.scalar_type());
  at::Tensor grad_block = at::empty({weight.size(0) / r, r, r}, weight.options().dtype(acc));
  bat_batched::block_grad(grad_weight.to(acc).contiguous(), weight.contiguous(), grad_block);
  return grad_block;
}

at::Tensor weight_grad_of(const at::Tensor& grad_weight, const at::Tensor& block) {
  const at::Tensor g = grad_weight.contiguous();
  at::Tensor result = at::empty_like(g);
  bat_batched::weight_grad(g, block.to(accumulate_dtype(g.scalar_type())).contiguous(), result);
  return result;
}

// Rows of G = dy^T x computed at once. On the CPU all of them (the measured path). On CUDA
// G [out, in] in float32 would be the backward's largest temporary (as large as x in bf16
// at in = out, and twice the 5% peak-memory budget over standard): slabs of whole r-row
// blocks of at most 1/8 of x's bytes keep it small, and each slab is still one large GEMM
// (at the benchmark shape 8 slabs of 512 rows). The rule scales with the shape, so the
// number of slabs does not depend on the size (benchmarks/gpu_cost_model.py relies on it).
int64_t g_slab_rows(const at::Tensor& x, int64_t out, int64_t in, int64_t r) {
  if (!on_cuda_path(x)) return std::max<int64_t>(out, 1);
  const int64_t budget_bytes = x.numel() * static_cast<int64_t>(x.element_size()) / 8;
  const int64_t row_bytes = std::max<int64_t>(1, in * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(r, budget_bytes / row_bytes / r * r);
}

void check_x_for_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_float_tensor(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_same_device(op, "x", x, "weight", weight);
  check_same_dtype(op, "x", x, "weight", weight);
  check_size(op, "x", x, x.dim() - 1, weight.size(1), "in_features of weight");
}

}  // namespace

at::Tensor bat_weight(const at::Tensor& weight, const at::Tensor& block) {
  check_bat_layer("bat_weight", weight, block);
  const c10::OptionalDeviceGuard guard(at::device_of(weight));
  return transformed_weight(weight, block);
}

at::Tensor bat_block_grad(const at::Tensor& grad_weight, const at::Tensor& weight, int64_t r) {
  const char* op = "bat_block_grad";
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_float_tensor(op, "grad_weight", grad_weight);
  check_same_device(op, "grad_weight", grad_weight, "weight", weight);
  TORCH_CHECK(grad_weight.sizes() == weight.sizes(), "miss.", op,
              ": argument 'grad_weight' must have the shape of 'weight' ", weight.sizes(), ", got ",
              grad_weight.sizes());
  TORCH_CHECK(r >= 1 && weight.size(0) % r == 0 && weight.size(1) % r == 0, "miss.", op,
              ": argument 'r' (", r, ") must divide in_features (", weight.size(1),
              ") and out_features (", weight.size(0), ")");
  const c10::OptionalDeviceGuard guard(at::device_of(weight));
  return block_grad_of(grad_weight, weight, r);
}

at::Tensor bat_weight_grad(const at::Tensor& grad_weight, const at::Tensor& block) {
  const char* op = "bat_weight_grad";
  check_float_tensor(op, "grad_weight", grad_weight);
  check_dim(op, "grad_weight", grad_weight, 2);
  check_bat_block(op, block, grad_weight.size(1), grad_weight.size(0));
  check_same_device(op, "block", block, "grad_weight", grad_weight);
  const c10::OptionalDeviceGuard guard(at::device_of(grad_weight));
  return weight_grad_of(grad_weight, block);
}

at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& block) {
  const char* op = "bat_linear";
  check_bat_layer(op, weight, block);
  check_x_for_weight(op, x, weight);
  if (bias.has_value() && bias->defined()) {
    check_dim(op, "bias", *bias, 1);
    check_size(op, "bias", *bias, 0, weight.size(0), "out_features");
    check_same_device(op, "bias", *bias, "weight", weight);
    check_same_dtype(op, "bias", *bias, "weight", weight);
  }
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  return at::linear(x, transformed_weight(weight, block), bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bat_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& block, std::array<bool, 3> output_mask) {
  const char* op = "bat_linear_backward";
  check_bat_layer(op, weight, block);
  check_x_for_weight(op, x, weight);
  check_float_tensor(op, "grad_out", grad_out);
  check_same_device(op, "grad_out", grad_out, "weight", weight);
  check_same_dtype(op, "grad_out", grad_out, "weight", weight);
  TORCH_CHECK(grad_out.dim() == x.dim() &&
                  grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                  grad_out.size(-1) == weight.size(0),
              "miss.", op, ": argument 'grad_out' must have shape x.shape[:-1] + [out_features=",
              weight.size(0), "], got ", grad_out.sizes());
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  const bool need_x = output_mask[0], need_weight = output_mask[1], need_block = output_mask[2];
  const int64_t rows = num_rows(x), in = weight.size(1), out = weight.size(0);
  const at::Tensor dy = grad_out.reshape({rows, out});

  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_x) grad_x = at::mm(dy, transformed_weight(weight, block)).view(x.sizes());

  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_block = at::empty({0}, block.options());
  if (need_weight || need_block) {
    // G in float32 (float64 for float64): dB sums r * in / r products of G with W, and G
    // rounded to bf16 would carry a 2^-9 relative error into every one of them. The operands
    // stay in their dtype where the device can (mm_accumulate).
    const at::ScalarType acc = accumulate_dtype(x.scalar_type());
    const at::Tensor x2d = x.reshape({rows, in});
    const at::Tensor dy_t = dy.t();
    const int64_t r = block.size(-1), step = g_slab_rows(x, out, in, r);
    // Once for every slab: W contiguous, and the block in the accumulation dtype.
    const at::Tensor w = weight.contiguous();
    const at::Tensor block_acc = need_weight ? block.to(acc).contiguous() : at::Tensor();
    if (need_block) grad_block = at::empty({out / r, r, r}, block.options().dtype(acc));
    if (need_weight) grad_weight = at::empty_like(w);
    for (int64_t first = 0; first < out; first += step) {
      const int64_t count = std::min(step, out - first);
      const at::Tensor g = mm_accumulate(dy_t.narrow(0, first, count), x2d, acc);
      if (need_block) {
        at::Tensor slab = grad_block.narrow(0, first / r, count / r);
        bat_batched::block_grad(g, w.narrow(0, first, count), slab);
      }
      if (need_weight) {  // written straight into its rows of grad_weight, in W's dtype
        at::Tensor slab = grad_weight.narrow(0, first, count);
        bat_batched::weight_grad(g, block_acc.narrow(0, first / r, count / r), slab);
      }
    }
    if (need_block) grad_block = grad_block.to(block.scalar_type());
  }
  return {grad_x, grad_weight, grad_block};
}

}  // namespace miss
