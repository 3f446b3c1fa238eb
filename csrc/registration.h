// The schemas of the miss ops, defined once (csrc/registration.cpp) for the `miss` namespace
// and, in builds with the emulator, again for `miss_emulated_cuda` (csrc/emulator/).
#pragma once

#include <torch/csrc/stable/library.h>

namespace miss {
void define_schemas(torch::stable::detail::StableLibrary& m);
}

// Calls X(name) for every op of define_schemas, so each namespace registers all of them.
#define MISS_FOR_EACH_OP(X) \
  X(shard_fold)             \
  X(shard_tile_add)         \
  X(shard_linear)           \
  X(shard_delta_add)        \
  X(shard_linear_backward)  \
  X(bat_weight)             \
  X(bat_block_grad)         \
  X(bat_weight_grad)        \
  X(bat_linear)             \
  X(bat_linear_backward)    \
  X(merge_)                 \
  X(unmerge_)
