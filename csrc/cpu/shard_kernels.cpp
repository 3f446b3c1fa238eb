// CPU kernels of the standard and mini variants: fold, its adjoint (tile), the out-tiled add,
// and the in-place merge. Rows are split across torch's threads (parallel_for); fp16/bf16 are
// widened to float on load and rounded once on store (acc_t: float, or double for double).
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../kernels.h"
#include "../shard_index.h"
#include "../tensor_views.h"
#include "../torch_api.h"
#include "add_span.h"

namespace miss {
namespace cpu {
namespace {

// Rows per parallel task: enough columns per task that scheduling is noise.
int64_t row_grain(int64_t columns) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, columns)); }

constexpr int kPhiloxLanes = 32;
constexpr int64_t kLaneColumns = kPhiloxLanes * kMaskColumnsPerCall;

// dropout_keep_mask (philox_dropout.h, shared with the CUDA kernels) for 32 column groups at
// once: four independent vector chains in flight through the 10 dependent Philox rounds. Per
// Philox call this measured ~12-15 ns, against ~30 ns one group at a time and ~24 ns with 8
// lanes (2-core EPYC, one thread). target_clones adds an AVX2 build chosen at load time (the
// products become vpmuludq; flatten inlines the header's template into each clone); the
// wheel stays baseline x86-64.
__attribute__((target_clones("avx2", "default"), flatten))
void keep_mask_of_groups(int64_t seed, uint32_t threshold, int64_t row, int64_t first_group, float* keep) {
  dropout_keep_mask<kPhiloxLanes>(seed, threshold, row, first_group, keep);
}

// The dropout multiplier of every column of row n (scale or 0).
template <typename acc_t>
void fill_dropout_row(const DropoutParams& dropout, int64_t seed, int64_t row, int64_t width,
                      acc_t* multipliers) {
  const acc_t scale = static_cast<acc_t>(dropout.scale);
  float keep[kLaneColumns];
  for (int64_t first = 0; first < width; first += kLaneColumns) {
    keep_mask_of_groups(seed, dropout.threshold, row, first / kMaskColumnsPerCall, keep);
    const int64_t count = std::min<int64_t>(kLaneColumns, width - first);
    for (int64_t k = 0; k < count; ++k) multipliers[first + k] = static_cast<acc_t>(keep[k]) * scale;
  }
}

template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void fold_rows(const scalar_t* x, const RowIndexer& rows, int64_t in, int64_t r,
               const DropoutParams& dropout, acc_t* fold, int64_t begin, int64_t end) {
  const int64_t cs = rows.column_stride;
  const int64_t seed = dropout.enabled ? dropout.seed() : 0;
  std::vector<acc_t> multipliers(dropout.enabled ? in : 0);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* row = x + rows.row_offset(n);
    acc_t* out = fold + n * r;
    std::fill(out, out + r, acc_t(0));
    if (dropout.enabled) fill_dropout_row(dropout, seed, n, in, multipliers.data());
    for (int64_t s = 0; s * r < in; ++s) {
      const int64_t width = shard_width(in, r, s);
      const int64_t first = s * r;
      if (dropout.enabled) {
        const acc_t* m = multipliers.data() + first;
        for (int64_t c = 0; c < width; ++c) out[c] += static_cast<acc_t>(row[(first + c) * cs]) * m[c];
      } else if (cs == 1) {
        const scalar_t* shard = row + first;
        for (int64_t c = 0; c < width; ++c) out[c] += static_cast<acc_t>(shard[c]);
      } else {
        for (int64_t c = 0; c < width; ++c) out[c] += static_cast<acc_t>(row[(first + c) * cs]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
void tile_rows(scalar_t* grad_x, int64_t in, const acc_t* g, int64_t r,
               const DropoutParams& dropout, bool accumulate, int64_t begin, int64_t end) {
  const int64_t seed = dropout.enabled ? dropout.seed() : 0;
  std::vector<acc_t> multipliers(dropout.enabled ? in : 0);
  for (int64_t n = begin; n < end; ++n) {
    scalar_t* row = grad_x + n * in;
    const acc_t* gn = g + n * r;
    if (dropout.enabled) fill_dropout_row(dropout, seed, n, in, multipliers.data());
    for (int64_t s = 0; s * r < in; ++s) {
      const int64_t width = shard_width(in, r, s);
      scalar_t* shard = row + s * r;
      const acc_t* m = dropout.enabled ? multipliers.data() + s * r : nullptr;
      for (int64_t c = 0; c < width; ++c) {
        const acc_t value = m != nullptr ? m[c] * gn[c] : gn[c];
        shard[c] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(shard[c]) + value : value);
      }
    }
  }
}

// The merged rows [begin, end) of W: W[o, i] + sign * B[i % r, o % m], rounded to W's dtype,
// as one `row_span(o, added)` per row, added[i] = sign * B[i % r, o % m] for i < in (one call
// per row, not per shard: per-shard calls of r elements cost more than the data pass).
template <typename acc_t, typename RowSpan>
void for_each_merged_row(int64_t in, const acc_t* block, int64_t r, int64_t m, float sign, int64_t begin,
                         int64_t end, RowSpan row_span) {
  std::vector<acc_t> added(in);
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t c = 0; c < r; ++c) added[c] = sign * block[c * m + o % m];
    for (int64_t first = r; first < in; first += r) {
      std::copy_n(added.data(), std::min(r, in - first), added.data() + first);
    }
    row_span(o, added.data());
  }
}

}  // namespace

void shard_fold(const Tensor& x, const DropoutParams& dropout, Tensor& fold) {
  const int64_t rows = fold.size(0), r = fold.size(1), in = x.size(-1);
  if (rows == 0) return;
  const RowIndexer indexer = make_row_indexer(x);
  MISS_DISPATCH_FLOAT(x.scalar_type(), "miss_shard_fold", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    auto* out = fold.mutable_data_ptr<opmath_t<scalar_t>>();
    torch::stable::parallel_for(0, rows, row_grain(in), [&](int64_t begin, int64_t end) {
      fold_rows(data, indexer, in, r, dropout, out, begin, end);
    });
  });
}

void shard_tile(Tensor& grad_x, const Tensor& g, const DropoutParams& dropout,
                bool accumulate) {
  const int64_t rows = grad_x.size(0), in = grad_x.size(1), r = g.size(1);
  if (rows == 0) return;
  MISS_DISPATCH_FLOAT(grad_x.scalar_type(), "miss_shard_tile", [&] {
    scalar_t* data = grad_x.mutable_data_ptr<scalar_t>();
    const auto* gp = g.const_data_ptr<opmath_t<scalar_t>>();
    torch::stable::parallel_for(0, rows, row_grain(in), [&](int64_t begin, int64_t end) {
      tile_rows(data, in, gp, r, dropout, accumulate, begin, end);
    });
  });
}

void add_out_tiled(Tensor& y, const Tensor& v) {
  const int64_t rows = y.size(0), out = y.size(1), m = v.size(1);
  if (rows == 0) return;
  MISS_DISPATCH_FLOAT(y.scalar_type(), "miss_add_out_tiled", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t* vp = v.const_data_ptr<acc_t>();
    torch::stable::parallel_for(0, rows, row_grain(out), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* row = yp + n * out;
        const acc_t* vn = vp + n * m;
        for (int64_t first = 0; first < out; first += m) add_span(row + first, vn, m, row + first);
      }
    });
  });
}

void shard_merge(const Tensor& weight, const Tensor& block_acc, float sign, Tensor& out) {
  const int64_t rows = weight.size(0), in = weight.size(1);
  const int64_t r = block_acc.size(0), m = block_acc.size(1);
  if (weight.numel() == 0) return;
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* bp = block_acc.const_data_ptr<acc_t>();
    torch::stable::parallel_for(0, rows, row_grain(in), [&](int64_t begin, int64_t end) {
      for_each_merged_row(in, bp, r, m, sign, begin, end, [&](int64_t o, const acc_t* added) {
        add_span(wp + o * in, added, in, op + o * in);
      });
    });
  });
}

bool shard_merge_is_finite(const Tensor& weight, const Tensor& block_acc, float sign) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t r = block_acc.size(0), m = block_acc.size(1);
  std::atomic<bool> finite{true};
  if (weight.numel() == 0) return true;
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_shard_merge_is_finite", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const acc_t* bp = block_acc.const_data_ptr<acc_t>();
    torch::stable::parallel_for(0, out, row_grain(in), [&](int64_t begin, int64_t end) {
      bool chunk_finite = true;
      for_each_merged_row(in, bp, r, m, sign, begin, end, [&](int64_t o, const acc_t* added) {
        const scalar_t* row = wp + o * in;
        for (int64_t i = 0; i < in; ++i) {
          chunk_finite &= std::isfinite(static_cast<double>(static_cast<scalar_t>(static_cast<acc_t>(row[i]) + added[i])));
        }
      });
      if (!chunk_finite) finite = false;
    });
  });
  return finite.load();
}

void add_block_rows(Tensor& t3, const Tensor& block_acc, double sign) {
  const int64_t k = t3.size(0), in = t3.size(1), r = t3.size(2);
  if (t3.numel() == 0) return;
  const int64_t rows_per_block_row = in / r;  // the rows a * (in / r) + j that get B_k[a]
  MISS_DISPATCH_FLOAT(t3.scalar_type(), "miss_add_block_rows", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* tp = t3.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = block_acc.const_data_ptr<scalar_t>();
    const auto s = static_cast<acc_t>(sign);
    torch::stable::parallel_for(0, k * in, row_grain(r), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t block = row / in, a = (row % in) / rows_per_block_row;
        scalar_t* dst = tp + row * r;
        const scalar_t* add = bp + (block * r + a) * r;
        for (int64_t c = 0; c < r; ++c) {
          dst[c] = static_cast<scalar_t>(static_cast<acc_t>(dst[c]) + s * static_cast<acc_t>(add[c]));
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace miss
