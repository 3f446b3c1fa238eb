// In-place merge and unmerge of one adapter into its base weight, any variant (read from
// the block's rank). Each either completes or leaves the weight bit-identical: every check,
// the finiteness check of a safe merge included, runs before the first write.
#include <c10/core/DeviceGuard.h>

#include "../checks.h"
#include "../kernels.h"
#include "bat_batched.h"
#include "ops.h"

namespace miss {
namespace {

void check_weight_for_merge(const char* op, const at::Tensor& weight, const at::Tensor& block) {
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(weight.is_contiguous(), "miss.", op,
              ": argument 'weight' must be contiguous to be updated in place, got strides ",
              weight.strides());
  check_float_tensor(op, "block", block);
  check_same_device(op, "block", block, "weight", weight);
  TORCH_CHECK(block.dim() == 2 || block.dim() == 3, "miss.", op,
              ": argument 'block' must be 2-D (standard [r, out], mini [r, mini_r]) or 3-D (bat "
              "[out / r, r, r]), got shape ", block.sizes());
  if (block.dim() == 2) {
    check_shard_block(op, block, weight.size(1), weight.size(0));
  } else {
    check_bat_block(op, block, weight.size(1), weight.size(0));
  }
}

// inv(I + B_k) for every k, in float64, after checking that each I + B_k is well conditioned
// (1-norm condition number at most kMaxUnmergeCondition): past that, unmerge would amplify
// the rounding of the merged weight into a visibly wrong W.
at::Tensor checked_inverse_of_identity_plus(const at::Tensor& block) {
  const int64_t r = block.size(-1);
  const at::Tensor a = block.to(at::kDouble) + at::eye(r, block.options().dtype(at::kDouble));
  auto [inverse, info] = at::linalg_inv_ex(a);
  const at::Tensor condition = at::linalg_matrix_norm(a, 1, {-2, -1}) *
                               at::linalg_matrix_norm(inverse, 1, {-2, -1});
  const at::Tensor info_cpu = info.cpu();
  const at::Tensor condition_cpu = condition.cpu();
  for (int64_t k = 0; k < block.size(0); ++k) {
    const double c = condition_cpu[k].item<double>();
    // A singular matrix has no finite condition number (the inverse is Inf/NaN): say singular.
    TORCH_CHECK(info_cpu[k].item<int64_t>() == 0 && std::isfinite(c), "miss.unmerge_: I + block[",
                k, "] is singular: the bat merge cannot be undone; weight left unchanged");
    TORCH_CHECK(c <= kMaxUnmergeCondition, "miss.unmerge_: I + block[", k,
                "] is ill-conditioned (1-norm condition number ", c, ", at most ",
                kMaxUnmergeCondition, " accepted): the bat merge cannot be undone; weight left "
                "unchanged");
  }
  return inverse.contiguous();
}

}  // namespace

void merge_(at::Tensor& weight, const at::Tensor& block, bool check_finite) {
  const char* op = "merge_";
  check_weight_for_merge(op, weight, block);
  const c10::OptionalDeviceGuard guard(at::device_of(weight));
  const at::Tensor block_acc = block.to(accumulate_dtype(weight.scalar_type())).contiguous();
  if (block.dim() == 2) {
    TORCH_CHECK(!check_finite || MISS_ROUTE(weight, shard_merge_is_finite, weight, block_acc, 1.0f),
                "miss.merge_: merging would put NaN or Inf into 'weight'; weight left unchanged");
    MISS_ROUTE(weight, shard_merge, weight, block_acc, 1.0f, weight);
    return;
  }
  if (!check_finite) {
    bat_batched::transform(weight, block_acc, weight);
    return;
  }
  at::Tensor merged = at::empty_like(weight);
  bat_batched::transform(weight, block_acc, merged);
  TORCH_CHECK(at::isfinite(merged).all().item<bool>(),
              "miss.merge_: merging would put NaN or Inf into 'weight'; weight left unchanged");
  weight.copy_(merged);
}

void unmerge_(at::Tensor& weight, const at::Tensor& block) {
  check_weight_for_merge("unmerge_", weight, block);
  const c10::OptionalDeviceGuard guard(at::device_of(weight));
  const at::Tensor block_acc = block.to(accumulate_dtype(weight.scalar_type())).contiguous();
  if (block.dim() == 2) {
    MISS_ROUTE(weight, shard_merge, weight, block_acc, -1.0f, weight);
    return;
  }
  const at::Tensor inverse = checked_inverse_of_identity_plus(block);
  bat_batched::unmerge(weight, block_acc, inverse);
}

}  // namespace miss
