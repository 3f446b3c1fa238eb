// inv(I + B_k) for every block of a bat adapter and its 1-norm condition number, in float64,
// one CUDA block per matrix (kernels.h bat_inverse): what unmerge needs before it can touch
// the weight. ATen's inverse on CUDA would be about a dozen launches (identity, conversion,
// the batched LU of cuSOLVER/MAGMA, the norms), and its first call loads those libraries;
// here it is one launch, and one copy of the K condition numbers to the host follows it.
//
// Gauss-Jordan with partial pivoting, in place in shared memory: at step p the pivot row q (the
// largest |A[i][p]|, i >= p) is swapped into row p, row p is divided by the pivot and its
// multiple subtracted from every other row, and column p becomes column p of the inverse.
// Undoing the row swaps on the columns, in reverse order, leaves inv(A). Each step is two
// barrier-separated phases: (1) choose the pivot and swap, keeping the new row p and the
// multipliers (column p) aside, (2) update every element; the threads owning column p + 1
// also find the candidates for the next pivot while they update it, so no phase of its own
// searches for it. The arithmetic (about 2 r^3 multiply-adds per matrix) is far below what the
// 2r + 4 barriers of the block cost (benchmarks/gpu_cost_model.py prices a launch by them).
// Compiled by nvcc (shard_kernels.cu) and for the emulator (csrc/emulator/emulated_kernels.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "../kernels.h"
#include "device_api.cuh"

namespace miss {
namespace MISS_CUDA_NAMESPACE {
namespace {

// Threads per column (row groups): thread t owns column t % r and rows t / r + g * groups, at
// most 16 groups (1024 threads at r = 64), so that phase 1 compares at most 16 pivot candidates.
constexpr int64_t kInverseMaxGroups = 16;
MISS_HOST_DEVICE int64_t inverse_row_groups(int64_t r) { return r < kInverseMaxGroups ? r : kInverseMaxGroups; }

// The largest |value| among the candidates and its row; on ties the smaller row, so every thread
// that reads the candidates picks the same one.
struct Pivot {
  double magnitude;
  int64_t row;
};
MISS_DEVICE Pivot better(Pivot a, Pivot b) {
  return (b.magnitude > a.magnitude || (b.magnitude == a.magnitude && b.row < a.row)) ? b : a;
}

// The inverse goes to inverse32 or to inverse64, whichever is not null.
template <typename in_t>
MISS_GLOBAL void MISS_LAUNCH_BOUNDS(kBatMaxRank * kInverseMaxGroups) bat_inverse_kernel(gptr<const in_t> block, int64_t matrices, int64_t r, gptr<float> inverse32,
                                    gptr<double> inverse64, gptr<double> condition) {
  constexpr int64_t ld = kBatMaxRank + 1;  // odd: a column's elements fall in different banks
  MISS_SHARED_ARRAY(double, a, kBatMaxRank * ld);
  MISS_SHARED_ARRAY(double, new_row, kBatMaxRank);      // row p after the swap, divided later
  MISS_SHARED_ARRAY(double, multiplier, kBatMaxRank);   // column p after the swap
  MISS_SHARED_ARRAY(double, column_sum_a, kBatMaxRank);        // of |I + B_k|, for its 1-norm
  MISS_SHARED_ARRAY(double, column_sum_inverse, kBatMaxRank);  // of |inv(I + B_k)|
  MISS_SHARED_ARRAY(double, candidate_magnitude, kBatMaxRank);  // one per row group
  MISS_SHARED_ARRAY(int64_t, candidate_row, kBatMaxRank);
  MISS_SHARED_ARRAY(int64_t, swapped_with, kBatMaxRank);
  const int64_t groups = inverse_row_groups(r), col = threadIdx.x % r, group = threadIdx.x / r;
  const auto column_abs_sum = [&](const auto& element) {  // sum over the rows of |element(row)|
    double sum = 0;
    for (int64_t i = 0; i < r; ++i) sum += std::fabs(element(i));
    return sum;
  };
  auto store = [&](int64_t at, double value) {
    if (device::is_null(inverse32)) {
      inverse64[at] = value;
    } else {
      inverse32[at] = static_cast<float>(value);
    }
  };
  for (int64_t m = blockIdx.x; m < matrices; m += gridDim.x) {
    const gptr<const in_t> b = block + m * r * r;
    // A = I + B_k, the candidates for the first pivot, and the column sums of |A| (group 0
    // reads its whole column from global memory, so that no barrier waits for the stores).
    const auto a_at = [&](int64_t i) { return static_cast<double>(b[i * r + col]) + (i == col ? 1.0 : 0.0); };
    Pivot best{-1.0, 0};
    for (int64_t i = group; i < r; i += groups) {
      const double value = a_at(i);
      a[i * ld + col] = value;
      if (col == 0) best = better(best, Pivot{std::fabs(value), i});
    }
    if (col == 0) {
      candidate_magnitude[group] = best.magnitude;
      candidate_row[group] = best.row;
    }
    if (group == 0) column_sum_a[col] = column_abs_sum(a_at);  // read by thread 0 at the end
    MISS_SYNC_THREADS();
    bool singular = false;
    for (int64_t p = 0; p < r; ++p) {
      // Phase 1: the pivot (every thread reads the same candidates), the swap, and the new row p
      // and the multipliers set aside (column p itself is not swapped: phase 2 overwrites it).
      Pivot pivot{candidate_magnitude[0], candidate_row[0]};
      for (int64_t g = 1; g < groups; ++g) pivot = better(pivot, Pivot{candidate_magnitude[g], candidate_row[g]});
      if (!(pivot.magnitude > 0)) {  // zero (or NaN) column below the diagonal: singular
        singular = true;  // the same for every thread
        break;
      }
      const int64_t q = pivot.row;
      if (threadIdx.x < r) {
        const int64_t c = threadIdx.x;
        const double at_p = a[p * ld + c], at_q = a[q * ld + c];
        multiplier[c] = a[(c == p ? q : c == q ? p : c) * ld + p];
        if (c != p) {
          new_row[c] = at_q;
          a[q * ld + c] = at_p;
          a[p * ld + c] = at_q;
        }
        if (c == 0) swapped_with[p] = q;
      }
      MISS_SYNC_THREADS();
      // Phase 2: row p divided by the pivot, its multiple subtracted from the other rows; the
      // owners of column p + 1 note the next pivot's candidates among rows p + 1 on.
      const double inverse_pivot = 1.0 / multiplier[p];
      const double scaled = (col == p ? 1.0 : static_cast<double>(new_row[col])) * inverse_pivot;
      best = Pivot{-1.0, 0};
      for (int64_t i = group; i < r; i += groups) {
        const double updated = i == p ? scaled : (col == p ? 0.0 : static_cast<double>(a[i * ld + col])) -
                                                     static_cast<double>(multiplier[i]) * scaled;
        a[i * ld + col] = updated;
        if (col == p + 1 && i > p) best = better(best, Pivot{std::fabs(updated), i});
      }
      if (col == p + 1) {
        candidate_magnitude[group] = best.magnitude;
        candidate_row[group] = best.row;
      }
      MISS_SYNC_THREADS();
    }
    if (!singular) {
      // The row swaps undone on the columns, in reverse order: each thread of group 0 one row.
      if (group == 0) {
        const int64_t i = col;
        for (int64_t p = r - 1; p >= 0; --p) {
          const int64_t q = swapped_with[p];
          if (q != p) {
            const double t = a[i * ld + p];
            a[i * ld + p] = a[i * ld + q];
            a[i * ld + q] = t;
          }
        }
      }
      MISS_SYNC_THREADS();
      for (int64_t i = group; i < r; i += groups) store(m * r * r + i * r + col, a[i * ld + col]);
      if (group == 0) column_sum_inverse[col] = column_abs_sum([&](int64_t i) { return double{a[i * ld + col]}; });
    } else {
      for (int64_t i = group; i < r; i += groups) store(m * r * r + i * r + col, static_cast<double>(NAN));
    }
    MISS_SYNC_THREADS();
    if (threadIdx.x == 0) {
      double norm_a = 0, norm_inverse = 0;
      for (int64_t c = 0; c < r; ++c) {
        norm_a = std::fmax(norm_a, column_sum_a[c]);
        if (!singular) norm_inverse = std::fmax(norm_inverse, column_sum_inverse[c]);
      }
      // A singular (or NaN) matrix has no finite condition number.
      condition[m] = singular ? static_cast<double>(INFINITY) : norm_a * norm_inverse;
    }
    MISS_SYNC_THREADS();  // the next matrix overwrites the shared arrays
  }
}

}  // namespace

void bat_inverse(const Tensor& block_acc, Tensor& inverse, Tensor& condition) {
  const int64_t matrices = block_acc.size(0), r = block_acc.size(-1);
  MISS_INTERNAL_ASSERT(r >= 1 && r <= kBatMaxRank && block_acc.is_contiguous() && inverse.is_contiguous() &&
                       condition.is_contiguous() && condition.scalar_type() == kDouble);
  if (matrices == 0) return;
  MISS_DEVICE_GUARD(block_acc);
  const unsigned int threads = static_cast<unsigned int>(r * inverse_row_groups(r));
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(matrices, 8 * device::sm_count()));
  const auto cond = device::output<double>(condition, "condition");
  MISS_INTERNAL_ASSERT(inverse.scalar_type() == kFloat || inverse.scalar_type() == kDouble);
  const gptr<float> inv32 = inverse.scalar_type() == kFloat ? device::output<float>(inverse, "inverse") : gptr<float>(nullptr);
  const gptr<double> inv64 = inverse.scalar_type() == kDouble ? device::output<double>(inverse, "inverse") : gptr<double>(nullptr);
  MISS_DISPATCH_FLOAT(block_acc.scalar_type(), "miss_bat_inverse_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      const auto b = device::input<scalar_t>(block_acc, "block");
      MISS_LAUNCH(bat_inverse_kernel<scalar_t>, grid, threads, b, matrices, r, inv32, inv64, cond);
    } else {
      MISS_CHECK(false, "miss: bat_inverse takes a float32/float64 block, got ", block_acc.scalar_type());
    }
  });
}

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
