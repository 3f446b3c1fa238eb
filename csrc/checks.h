// Argument checks for the miss ops. Every message names the op, the argument, what was
// expected and what was given, because these are the errors users read first.
#pragma once

#include <optional>
#include <string>

#include "torch_api.h"

namespace miss {

inline bool is_supported_float(ScalarType t) {
  return t == kFloat || t == kDouble || t == kHalf || t == kBFloat16;
}

// The dtype kernels accumulate in for data of dtype t: float64 for float64 (so gradcheck
// runs in float64), float32 for everything else.
inline ScalarType accumulate_dtype(ScalarType t) {
  return t == kDouble ? kDouble : kFloat;
}

inline void check_float_tensor(const char* op, const char* name, const Tensor& t) {
  MISS_CHECK(t.defined(), "miss.", op, ": argument '", name, "' must be a tensor, got None");
  MISS_CHECK(is_supported_float(t.scalar_type()), "miss.", op, ": argument '", name,
              "' must have dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const Tensor& t, int64_t dim) {
  MISS_CHECK(t.dim() == dim, "miss.", op, ": argument '", name, "' must be ", dim,
              "-D, got shape ", t.sizes());
}

inline void check_min_dim(const char* op, const char* name, const Tensor& t, int64_t dim) {
  MISS_CHECK(t.dim() >= dim, "miss.", op, ": argument '", name, "' must have at least ", dim,
              " dim(s), got shape ", t.sizes());
}

inline void check_size(const char* op, const char* name, const Tensor& t, int64_t dim,
                       int64_t expected, const char* meaning) {
  MISS_CHECK(t.size(dim) == expected, "miss.", op, ": argument '", name, "' must have size ",
              expected, " (", meaning, ") in dim ", dim, ", got shape ", t.sizes());
}

inline void check_same_device(const char* op, const char* name, const Tensor& t,
                              const char* ref_name, const Tensor& ref) {
  MISS_CHECK(t.device() == ref.device(), "miss.", op, ": argument '", name,
              "' must be on the same device as '", ref_name, "' (", ref.device(), "), got ",
              t.device());
}

inline void check_same_dtype(const char* op, const char* name, const Tensor& t,
                             const char* ref_name, const Tensor& ref) {
  MISS_CHECK(t.scalar_type() == ref.scalar_type(), "miss.", op, ": argument '", name,
              "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

inline void check_rank_in_range(const char* op, const char* name, int64_t r, int64_t limit,
                                const char* limit_name) {
  MISS_CHECK(r >= 1 && r <= limit, "miss.", op, ": argument '", name, "' must be in [1, ",
              limit_name, "=", limit, "], got ", r);
}

inline void check_divides(const char* op, const char* name, int64_t divisor, int64_t value,
                          const char* value_name) {
  MISS_CHECK(divisor >= 1 && value % divisor == 0, "miss.", op, ": argument '", name, "' (",
              divisor, ") must divide ", value_name, " (", value, ")");
}

inline void check_probability(const char* op, double p) {
  MISS_CHECK(p >= 0.0 && p <= 1.0, "miss.", op, ": argument 'p' must be in [0, 1], got ", p);
}

// The dropout seed: a one-element int64 tensor on the data's device or on the CPU.
inline void check_seed(const char* op, double p, const OptTensor& seed,
                       const Tensor& data) {
  if (p == 0.0) return;
  MISS_CHECK(seed.has_value() && seed->defined(), "miss.", op,
              ": argument 'seed' must be a one-element int64 tensor when p > 0 (p=", p,
              "), got None");
  MISS_CHECK(seed->scalar_type() == kLong && seed->numel() == 1, "miss.", op,
              ": argument 'seed' must be a one-element int64 tensor, got dtype ",
              seed->scalar_type(), " and shape ", seed->sizes());
  MISS_CHECK(seed->device() == data.device() || seed->is_cpu(), "miss.", op,
              ": argument 'seed' must be on ", data.device(), " or the CPU, got ",
              seed->device());
}

// A standard/mini block [r, m] for a layer of in x out: 1 <= r <= in, m divides out.
inline void check_shard_block(const char* op, const Tensor& block, int64_t in, int64_t out) {
  check_float_tensor(op, "block", block);
  MISS_CHECK(block.dim() == 2, "miss.", op,
              ": argument 'block' must be 2-D [r, out_features] (standard) or [r, mini_r] (mini), "
              "got shape ", block.sizes());
  check_rank_in_range(op, "block.size(0) (r)", block.size(0), in, "in_features");
  MISS_CHECK(block.size(1) >= 1 && out % block.size(1) == 0, "miss.", op,
              ": argument 'block' must have a second dim (out_features or mini_r) that divides "
              "out_features=", out, ", got shape ", block.sizes());
}

// A BAT block [out / r, r, r] for a layer of in x out: r divides both.
inline void check_bat_block(const char* op, const Tensor& block, int64_t in, int64_t out) {
  check_float_tensor(op, "block", block);
  MISS_CHECK(block.dim() == 3 && block.size(1) == block.size(2) && block.size(1) >= 1, "miss.",
              op, ": argument 'block' must be 3-D [out_features / r, r, r] (bat), got shape ",
              block.sizes());
  const int64_t r = block.size(2);
  MISS_CHECK(in % r == 0 && out % r == 0, "miss.", op, ": bat needs r (", r,
              ") to divide in_features (", in, ") and out_features (", out, ")");
  check_size(op, "block", block, 0, out / r, "out_features / r");
}

}  // namespace miss
