// Index math shared by the CPU and CUDA kernels, so that the CPU tests exercise it.
//
// Shards: column i of a row of width `in` belongs to shard i / r at position i % r; the last
// shard is partial when in % r != 0 (the zero-padding PEFT materialises is never built).
// Out-fold (mini): column o of an output row of width `out` maps to block column o % mini_r.
// BAT tiles: W is cut into r x r tiles; element (o, i) is in tile (k, j) = (o / r, i / r) at
// (a, b) = (o % r, i % r); every tile of row-block k shares B_k.
#pragma once

#include <cstdint>

#include "philox_dropout.h"  // MISS_HOST_DEVICE

namespace miss {

MISS_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Width of shard s of a row of `in` columns cut into shards of width r.
MISS_HOST_DEVICE int64_t shard_width(int64_t in, int64_t r, int64_t s) {
  const int64_t rest = in - s * r;
  return rest < r ? rest : r;
}

// Maps a logical row n of x (leading dims flattened, C order) to its memory offset, for any
// strides. Leading dims are coalesced on the host first, so a contiguous or transposed-2D x
// needs one level. kMaxDims bounds what a kernel argument carries: 25, the most dims torch's
// own CUDA elementwise kernels take (TensorIterator's MAX_DIMS), so any x that torch can add
// to can be read in place (408 bytes, far below the 4 KiB a CUDA kernel argument may have).
struct RowIndexer {
  static constexpr int kMaxDims = 25;
  int32_t ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int64_t column_stride = 1;

  MISS_HOST_DEVICE int64_t row_offset(int64_t n) const {
    int64_t offset = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t index = n % sizes[d];
      n /= sizes[d];
      offset += index * strides[d];
    }
    return offset;
  }
};

}  // namespace miss
