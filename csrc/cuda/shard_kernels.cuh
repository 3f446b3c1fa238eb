// CUDA kernels of the standard and mini variants, and their launchers: compiled by nvcc for
// the GPU (shard_kernels.cu) and by the host compiler for the emulator
// (csrc/emulator/emulated_kernels.cpp), through device_api.cuh. The index math (shards, rows
// of a strided x) and the dropout mask come from the headers the CPU kernels use, so the CPU
// tests cover them and both devices draw the same mask for the same seed.
#pragma once

#include <cstdint>

#include "../aten_calls.h"
#include "../kernels.h"
#include "../shard_index.h"
#include "../tensor_views.h"
#include "device_api.cuh"
#include "mma_tiles.cuh"  // split_bf16

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

using device::gptr;
using device::kThreads;

// One block per row (grid-stride over rows). A lane owns a run of kRun consecutive
// positions of a shard (kRun = 8 when r % 8 == 0, else 1). With fewer runs than threads the
// threads form blockDim / lanes groups of `lanes` lanes: lane l of group g sums shards
// g, g + groups, ... over its run (consecutive lanes read consecutive columns), then the
// groups are summed in shared memory. With more runs one group loops over them. With
// dropout, a run of 8 is one 8-column group of the mask: one Philox call per run, not per
// element (philox_dropout.h; benchmarks/gpu_cost_model.py prices the calls).
template <int kRun, typename scalar_t, typename acc_t = opmath_t<scalar_t>>
MISS_GLOBAL void shard_fold_kernel(gptr<const scalar_t> MISS_RESTRICT x, RowIndexer indexer, int64_t rows,
                                   int64_t in, int64_t r, DropoutParams dropout,
                                   gptr<acc_t> MISS_RESTRICT fold) {
  MISS_SHARED_ARRAY(acc_t, partial, kThreads * kRun);
  const int64_t runs = r / kRun;
  const int64_t lanes = runs < blockDim.x ? runs : blockDim.x;
  const int64_t groups = blockDim.x / lanes;
  const int64_t lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int64_t shards = ceil_div(in, r);
  const int64_t cs = indexer.column_stride;
  const int64_t seed = dropout.enabled ? dropout.seed() : 0;
  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const gptr<const scalar_t> row = x + indexer.row_offset(n);
    for (int64_t first = 0; first < runs; first += lanes) {
      const int64_t c0 = (first + lane) * kRun;  // the run's first position in a shard
      acc_t acc[kRun];
      for (int k = 0; k < kRun; ++k) acc[k] = 0;
      if (group < groups && c0 < r) {
        for (int64_t s = group; s < shards; s += groups) {
          const int64_t i0 = s * r + c0;
          if (i0 >= in) continue;
          if constexpr (kRun == 1) {
            if (dropout.enabled) device::note_philox_call();
            acc[0] += static_cast<acc_t>(row[i0 * cs]) * dropout_multiplier<acc_t>(dropout, seed, n, i0);
          } else {
            uint32_t keep = 0xFFu;
            if (dropout.enabled) {
              keep = dropout_keep_bits(seed, dropout.threshold, n, i0 / kMaskColumnsPerCall);
              device::note_philox_call();
            }
            // the multiplier of dropout_multiplier, from the run's one call
            const acc_t kept = dropout.enabled ? static_cast<acc_t>(dropout.scale) : acc_t(1);
            for (int k = 0; k < kRun; ++k) {
              if (i0 + k < in) acc[k] += static_cast<acc_t>(row[(i0 + k) * cs]) * (((keep >> k) & 1u) ? kept : acc_t(0));
            }
          }
        }
      }
      if (groups == 1) {
        // Only group 0 holds sums: when lanes does not divide blockDim the threads past the
        // last whole group would otherwise write their zero over other columns (the race for
        // 128 < r < 256 the emulator caught; tests/test_emulated_cuda.py).
        if (group == 0 && c0 < r) {
          for (int k = 0; k < kRun; ++k) fold[n * r + c0 + k] = acc[k];
        }
      } else {
        for (int k = 0; k < kRun; ++k) partial[threadIdx.x * kRun + k] = acc[k];
        MISS_SYNC_THREADS();
        for (int64_t j = threadIdx.x; j < lanes * kRun; j += blockDim.x) {
          acc_t sum = 0;
          for (int64_t g = 0; g < groups; ++g) sum += partial[g * lanes * kRun + j];
          fold[n * r + first * kRun + j] = sum;
        }
        MISS_SYNC_THREADS();
      }
    }
  }
}

// --- Elementwise updates of a contiguous [rows, width] array ---------------------------
// One kernel serves the tile-add into grad_x and the out-tiled add into y: each thread
// updates kVec consecutive elements with one 16-byte load and store (the tail of the array
// one at a time). `Update::run(first, values, count)` turns the old values of elements
// first .. first + count - 1 (flat indices) into the new ones; src may be dst.

// The grid-stride loop of both kernels below. kReads: the old values come from src (which
// may be dst); otherwise they start as zeros and src is not read.
template <int kVec, bool kReads, typename scalar_t, typename Update>
MISS_DEVICE void update_elements(gptr<const scalar_t> src, gptr<scalar_t> dst, int64_t total, const Update& update) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x * kVec;
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; first < total;
       first += step) {
    if (first + kVec <= total) {
      device::Pack<scalar_t, kVec> pack;
      if constexpr (kReads) {
        pack = device::load_pack<kVec>(src + first);
      } else {
        for (int k = 0; k < kVec; ++k) pack.v[k] = scalar_t(0);
      }
      update.run(first, pack.v, kVec);
      device::store_pack<kVec>(dst + first, pack);
    } else {
      for (int64_t index = first; index < total; ++index) {
        scalar_t value = scalar_t(0);
        if constexpr (kReads) value = src[index];
        update.run(index, &value, 1);
        dst[index] = value;
      }
    }
  }
}

template <int kVec, typename scalar_t, typename Update>
MISS_GLOBAL void update_rows_kernel(gptr<const scalar_t> src, gptr<scalar_t> dst, int64_t total, Update update) {
  update_elements<kVec, true>(src, dst, total, update);
}

template <typename scalar_t, typename Update>
void launch_update_rows(const Tensor& src_tensor, Tensor& dst_tensor, int64_t total, const Update& update) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  // Every array updated here is one the op allocated (y, a clone, a GEMM's output), and both
  // allocators align those to at least 64 bytes.
  MISS_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(src_tensor.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dst_tensor.const_data_ptr()) % 16 == 0);
  const auto src = device::input<scalar_t>(src_tensor, "src");
  const auto dst = src_tensor.const_data_ptr() == dst_tensor.const_data_ptr() ? device::inout<scalar_t>(dst_tensor, "dst")
                                                                              : device::output<scalar_t>(dst_tensor, "dst");
  MISS_LAUNCH(update_rows_kernel<kVec>, device::blocks_for(ceil_div(total, kVec)), kThreads, src, dst, total, update);
}

// The same updates when the old values are not needed (they start as zeros): the array is
// only written, so an uninitialised output is never read and the pass costs one write.
template <int kVec, typename scalar_t, typename Update>
MISS_GLOBAL void write_rows_kernel(gptr<scalar_t> dst, int64_t total, Update update) {
  update_elements<kVec, false>(gptr<const scalar_t>(dst), dst, total, update);  // src unread
}

template <typename scalar_t, typename Update>
void launch_write_rows(Tensor& dst_tensor, int64_t total, const Update& update) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  MISS_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(dst_tensor.const_data_ptr()) % 16 == 0);
  const auto dst = device::output<scalar_t>(dst_tensor, "dst");
  MISS_LAUNCH(write_rows_kernel<kVec>, device::blocks_for(ceil_div(total, kVec)), kThreads, dst, total, update);
}

// grad_x[n, i] (+)= drop(n, i) * g[n, i % r]. With dropout, one Philox call per run of
// consecutive columns in one 8-column group (philox_dropout.h): once per thread and 16-byte
// pack for bf16/fp16 (8 elements), twice for float32.
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
struct TileUpdate {
  gptr<const acc_t> g;
  int64_t in, r;
  DropoutParams dropout;
  bool accumulate;
  MISS_DEVICE void run(int64_t first, scalar_t* values, int count) const {
    int64_t n = first / in, i = first % in;
    const int64_t seed = dropout.enabled ? dropout.seed() : 0;
    int64_t group = -1;
    uint32_t bits = 0;
    for (int k = 0; k < count; ++k) {
      acc_t value = g[n * r + i % r];
      if (dropout.enabled) {
        if (i / kMaskColumnsPerCall != group) {
          group = i / kMaskColumnsPerCall;
          bits = dropout_keep_bits(seed, dropout.threshold, n, group);
          device::note_philox_call();
        }
        value *= ((bits >> (i % kMaskColumnsPerCall)) & 1u) ? static_cast<acc_t>(dropout.scale) : acc_t(0);
      }
      values[k] = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(values[k]) + value : value);
      if (++i == in) {
        i = 0;
        ++n;
      }
    }
  }
};

// y[n, o] += v[n, o % m] (+ bias[o] when given)
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
struct OutTiledAdd {
  gptr<const acc_t> v;
  int64_t out, m;
  gptr<const scalar_t> bias;  // null: none
  MISS_DEVICE void run(int64_t first, scalar_t* values, int count) const {
    for (int k = 0; k < count; ++k) {
      const int64_t n = (first + k) / out, o = (first + k) % out;
      acc_t value = static_cast<acc_t>(values[k]) + v[n * m + o % m];
      if (!device::is_null(bias)) value += static_cast<acc_t>(bias[o]);
      values[k] = static_cast<scalar_t>(value);
    }
  }
};

// t3[k, row, c] += sign * B[k, row / (in / r), c] on a contiguous [K, in, r] array: the
// "+ B_k" of every tile of a BAT transform (kernels.h add_block_rows).
template <typename scalar_t, typename acc_t = opmath_t<scalar_t>>
struct AddBlockRows {
  gptr<const scalar_t> block;  // [K, r, r]
  int64_t in, r;
  acc_t sign;
  MISS_DEVICE void run(int64_t first, scalar_t* values, int count) const {
    for (int k = 0; k < count; ++k) {
      const int64_t row = (first + k) / r, c = (first + k) % r;  // row of the [K * in, r] view
      const int64_t a = (row % in) / (in / r);
      const acc_t added = static_cast<acc_t>(block[((row / in) * r + a) * r + c]);
      values[k] = static_cast<scalar_t>(static_cast<acc_t>(values[k]) + sign * added);
    }
  }
};

// bf16 pieces of a float32 array (kernels.h bf16_pieces): each thread splits one value and
// writes every slot that holds one of its pieces.
MISS_GLOBAL void bf16_pieces_kernel(gptr<const float> MISS_RESTRICT t, int64_t rows, int64_t cols,
                                    PiecePattern pattern, bool along_rows, gptr<BFloat16> MISS_RESTRICT out) {
  MISS_GRID_STRIDE_LOOP(index, rows * cols) {
    const int64_t n = index / cols, c = index % cols;
    BFloat16 piece[3];
    split_bf16(t[index], piece);
    for (int s = 0; s < pattern.slots; ++s) {
      const int64_t at = along_rows ? (s * rows + n) * cols + c : n * pattern.slots * cols + s * cols + c;
      out[at] = piece[pattern.piece[s]];
    }
  }
}

}  // namespace

void shard_fold(const Tensor& x, const DropoutParams& dropout, Tensor& fold) {
  const int64_t rows = fold.size(0), r = fold.size(1), in = x.size(-1);
  if (rows == 0) return;
  MISS_DEVICE_GUARD(x);
  const RowIndexer indexer = make_row_indexer(x);
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(rows, 65535 * 16));
  MISS_DISPATCH_FLOAT(x.scalar_type(), "miss_shard_fold_cuda", [&] {
    const auto x_ptr = device::input<scalar_t>(x, "x");
    const auto fold_ptr = device::output<opmath_t<scalar_t>>(fold, "fold");
    if (r % 8 == 0) {
      MISS_LAUNCH(shard_fold_kernel<8>, grid, kThreads, x_ptr, indexer, rows, in, r, dropout, fold_ptr);
    } else {
      MISS_LAUNCH(shard_fold_kernel<1>, grid, kThreads, x_ptr, indexer, rows, in, r, dropout, fold_ptr);
    }
  });
}

void shard_tile(Tensor& grad_x, const Tensor& g, const DropoutParams& dropout, bool accumulate) {
  const int64_t rows = grad_x.size(0), in = grad_x.size(1), r = g.size(1);
  if (grad_x.numel() == 0) return;
  MISS_DEVICE_GUARD(grad_x);
  MISS_DISPATCH_FLOAT(grad_x.scalar_type(), "miss_shard_tile_cuda", [&] {
    const TileUpdate<scalar_t> update{device::input<opmath_t<scalar_t>>(g, "g"), in, r, dropout, accumulate};
    if (accumulate) {
      launch_update_rows<scalar_t>(grad_x, grad_x, rows * in, update);
    } else {
      launch_write_rows<scalar_t>(grad_x, rows * in, update);
    }
  });
}

void add_out_tiled(Tensor& y, const Tensor& v) {
  const int64_t rows = y.size(0), out = y.size(1), m = v.size(1);
  if (y.numel() == 0) return;
  MISS_DEVICE_GUARD(y);
  MISS_DISPATCH_FLOAT(y.scalar_type(), "miss_add_out_tiled_cuda", [&] {
    const OutTiledAdd<scalar_t> update{device::input<opmath_t<scalar_t>>(v, "v"), out, m, nullptr};
    launch_update_rows<scalar_t>(y, y, rows * out, update);
  });
}

void write_out_tiled(Tensor& y, const Tensor& v, const OptTensor& bias) {
  const int64_t rows = y.size(0), out = y.size(1), m = v.size(1);
  if (y.numel() == 0) return;
  MISS_DEVICE_GUARD(y);
  MISS_DISPATCH_FLOAT(y.scalar_type(), "miss_write_out_tiled_cuda", [&] {
    const gptr<const scalar_t> bias_ptr = defined(bias) ? device::input<scalar_t>(*bias, "bias") : gptr<const scalar_t>(nullptr);
    const OutTiledAdd<scalar_t> update{device::input<opmath_t<scalar_t>>(v, "v"), out, m, bias_ptr};
    launch_write_rows<scalar_t>(y, rows * out, update);
  });
}

void add_block_rows(Tensor& t3, const Tensor& block_acc, double sign) {
  if (t3.numel() == 0) return;
  MISS_DEVICE_GUARD(t3);
  MISS_DISPATCH_FLOAT(t3.scalar_type(), "miss_add_block_rows_cuda", [&] {
    const AddBlockRows<scalar_t> update{device::input<scalar_t>(block_acc, "block"), t3.size(1), t3.size(2),
                                        static_cast<opmath_t<scalar_t>>(sign)};
    launch_update_rows<scalar_t>(t3, t3, t3.numel(), update);
  });
}

void bf16_pieces(const Tensor& t, const PiecePattern& pattern, bool along_rows, Tensor& out) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.numel() == 0) return;
  MISS_DEVICE_GUARD(t);
  const auto t_ptr = device::input<float>(t, "t");
  const auto out_ptr = device::output<BFloat16>(out, "out");
  MISS_LAUNCH(bf16_pieces_kernel, device::blocks_for(rows * cols), kThreads, t_ptr, rows, cols, pattern, along_rows,
              out_ptr);
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
