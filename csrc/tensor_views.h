// Host-side helpers that turn tensors and op arguments into the plain structs the kernels
// take (RowIndexer, DropoutParams). Shared by the CPU and CUDA launchers and the ops.
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include "philox_dropout.h"
#include "shard_index.h"
#include "torch_api.h"

namespace miss {

// Rows of a [..., width] tensor: the product of its leading dims.
inline int64_t num_rows(const Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Describes the leading dims of t (any strides) so that a kernel can find row n without a
// copy. Size-1 dims are dropped and adjacent dims merged where their strides allow it.
inline RowIndexer make_row_indexer(const Tensor& t) {
  RowIndexer ix;
  ix.column_stride = t.stride(t.dim() - 1);
  // At most t.dim() entries: a tensor of any rank is described without overrunning a buffer.
  std::vector<int64_t> sizes(std::max<int64_t>(t.dim(), 1)), strides(std::max<int64_t>(t.dim(), 1));
  int ndim = 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (ndim > 0 && strides[ndim - 1] == t.stride(d) * t.size(d)) {
      sizes[ndim - 1] *= t.size(d);
      strides[ndim - 1] = t.stride(d);
    } else {
      sizes[ndim] = t.size(d);
      strides[ndim] = t.stride(d);
      ++ndim;
    }
  }
  MISS_CHECK(ndim <= RowIndexer::kMaxDims, "miss: a tensor of shape ", t.sizes(),
              " and strides ", t.strides(), " has ", ndim,
              " leading dims whose strides cannot be merged; at most ", RowIndexer::kMaxDims,
              " (as torch's own CUDA elementwise ops) are read in place: call .contiguous() on it "
              "first");
  if (ndim == 0) {  // a single row
    sizes[0] = 1;
    strides[0] = 0;
    ndim = 1;
  }
  ix.ndim = ndim;
  for (int d = 0; d < ndim; ++d) {
    ix.sizes[d] = sizes[d];
    ix.strides[d] = strides[d];
  }
  return ix;
}

// The seed must already have passed check_seed. A seed that lives where the kernel runs is
// read there (no host sync on CUDA); a CPU seed for a CUDA kernel is passed by value.
inline DropoutParams make_dropout_params(double p, const OptTensor& seed,
                                         const Tensor& data) {
  DropoutParams d;
  if (p == 0.0) return d;
  d.enabled = true;
  d.threshold = dropout_threshold(p);
  d.scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  if (seed->device() == data.device()) {
    d.seed_ptr = seed->const_data_ptr<int64_t>();
  } else {
    d.seed_value = item<int64_t>(*seed);
  }
  return d;
}

}  // namespace miss
