// In-place merge and unmerge of one adapter into its base weight, any variant (read from
// the block's rank). Each either completes or leaves the weight bit-identical: every check,
// the finiteness check of a safe merge included, runs before the first write.
#include <cmath>

#include "../aten_calls.h"
#include "../checks.h"
#include "../kernels.h"
#include "bat_batched.h"
#include "ops.h"

namespace miss {
namespace {

void check_weight_for_merge(const char* op, const Tensor& weight, const Tensor& block) {
  check_float_tensor(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  MISS_CHECK(weight.is_contiguous(), "miss.", op,
              ": argument 'weight' must be contiguous to be updated in place, got strides ",
              weight.strides());
  check_float_tensor(op, "block", block);
  check_same_device(op, "block", block, "weight", weight);
  MISS_CHECK(block.dim() == 2 || block.dim() == 3, "miss.", op,
              ": argument 'block' must be 2-D (standard [r, out], mini [r, mini_r]) or 3-D (bat "
              "[out / r, r, r]), got shape ", block.sizes());
  if (block.dim() == 2) {
    check_shard_block(op, block, weight.size(1), weight.size(0));
  } else {
    check_bat_block(op, block, weight.size(1), weight.size(0));
  }
}

// The 1-norm of every matrix of a batch [K, r, r]: the largest column sum of |a|, as
// torch.linalg.matrix_norm(a, 1) computes it.
Tensor one_norms(const Tensor& a) { return torch::stable::amax(aten::sum(aten::abs(a), std::vector<int64_t>{-2}), -1); }

// inv(I + B_k) for every k, computed in float64 and returned in `dtype`, after checking that
// each I + B_k is well conditioned (1-norm condition number at most kMaxUnmergeCondition):
// past that, unmerge would amplify the rounding of the merged weight into a visibly wrong W.
// On the CUDA path one kernel computes the inverses and condition numbers (bat_inverse_kernels.cuh);
// elsewhere, and for r past its shared memory, ATen's batched inverse does.
Tensor checked_inverse_of_identity_plus(const Tensor& block_acc, ScalarType dtype) {
  const int64_t k_blocks = block_acc.size(0), r = block_acc.size(-1);
  Tensor inverse, condition, info;
  if (on_cuda_path(block_acc) && r <= kBatMaxRank) {
    inverse = aten::empty(block_acc.sizes(), dtype, block_acc.device());
    condition = aten::empty({k_blocks}, kDouble, block_acc.device());
    MISS_CALL_CUDA_ONLY(bat_inverse, block_acc, inverse, condition);  // +inf where singular
  } else {
    const Tensor a = aten::add(aten::to(block_acc, kDouble), aten::eye(r, kDouble, block_acc.device()));
    auto [inverse64, info_] = aten::linalg_inv_ex(a);
    condition = aten::mul(one_norms(a), one_norms(inverse64));
    inverse = aten::contiguous(aten::to(inverse64, dtype));
    info = info_;
  }
  // One copy of each to the host, read there: an ATen call per block would cost more host time
  // than the whole unmerge takes on a GPU.
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  // On a GPU a synchronising device-to-host copy (on the emulated device, where the tensors
  // are already on the host, the range still shows it to the cost model).
  const ProfilerRange range("miss::cuda_stand_in::copy_to_host", {&condition});
  const Tensor condition_cpu = aten::contiguous(aten::to(condition, cpu));
  const double* conditions = condition_cpu.const_data_ptr<double>();
  Tensor info_cpu;
  if (info.defined()) info_cpu = aten::contiguous(aten::to(aten::to(info, cpu), kLong));
  for (int64_t k = 0; k < k_blocks; ++k) {
    const double c = conditions[k];
    const bool factored = !info_cpu.defined() || info_cpu.const_data_ptr<int64_t>()[k] == 0;
    // A singular matrix has no finite condition number (the inverse is Inf/NaN): say singular.
    MISS_CHECK(factored && std::isfinite(c), "miss.unmerge_: I + block[",
                k, "] is singular: the bat merge cannot be undone; weight left unchanged");
    MISS_CHECK(c <= kMaxUnmergeCondition, "miss.unmerge_: I + block[", k,
                "] is ill-conditioned (1-norm condition number ", c, ", at most ",
                kMaxUnmergeCondition, " accepted): the bat merge cannot be undone; weight left "
                "unchanged");
  }
  return inverse;
}

// Whether unmerge runs on tensor cores (and so takes the inverse in float32).
bool unmerge_on_tensor_cores(const Tensor& weight, int64_t r) {
  bool fits = false;
  if (on_cuda_path(weight)) MISS_CALL_CUDA_ONLY(bat_untransform_mma_fits, weight, r, fits);
  return fits;
}

}  // namespace

void merge_(Tensor& weight, const Tensor& block, bool check_finite) {
  const char* op = "merge_";
  check_weight_for_merge(op, weight, block);
  const OptionalDeviceGuard guard(weight);
  const Tensor block_acc = as_accumulate(block, weight);
  if (block.dim() == 2) {
    MISS_CHECK(!check_finite || MISS_ROUTE(weight, shard_merge_is_finite, weight, block_acc, 1.0f),
                "miss.merge_: merging would put NaN or Inf into 'weight'; weight left unchanged");
    MISS_ROUTE(weight, shard_merge, weight, block_acc, 1.0f, weight);
    return;
  }
  if (!check_finite) {
    bat_batched::transform(weight, block_acc, weight);
    return;
  }
  Tensor merged = aten::empty_contiguous_like(weight);
  bat_batched::transform(weight, block_acc, merged);
  MISS_CHECK(item<bool>(aten::all(aten::isfinite(merged))),
              "miss.merge_: merging would put NaN or Inf into 'weight'; weight left unchanged");
  aten::copy_(weight, merged);
}

void unmerge_(Tensor& weight, const Tensor& block) {
  check_weight_for_merge("unmerge_", weight, block);
  const OptionalDeviceGuard guard(weight);
  const Tensor block_acc = as_accumulate(block, weight);
  if (block.dim() == 2) {
    MISS_ROUTE(weight, shard_merge, weight, block_acc, -1.0f, weight);
    return;
  }
  if (unmerge_on_tensor_cores(weight, block.size(-1))) {
    const Tensor inverse = checked_inverse_of_identity_plus(block_acc, kFloat);
    MISS_CALL_CUDA_ONLY(bat_untransform_mma, weight, inverse);
    return;
  }
  bat_batched::unmerge(weight, block_acc, checked_inverse_of_identity_plus(block_acc, kDouble));
}

}  // namespace miss
