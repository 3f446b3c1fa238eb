// CPU kernels of the BAT variant. W is read tile row by tile row: row o of tile (k, j) is the
// r contiguous values W[o, j*r : (j+1)*r], and every tile of row-block k = o / r shares the
// r x r matrix B_k, which stays in L1 while a thread walks its rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernels.h"

namespace miss {
namespace cpu {
namespace {

int64_t rows_grain(int64_t in, int64_t r) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in * r / 8));
}

#define MISS_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

void bat_transform(const at::Tensor& weight, const at::Tensor& block_acc, at::Tensor& out) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = block_acc.size(-1);
  if (weight.numel() == 0) return;
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_transform", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = block_acc.const_data_ptr<acc_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(in, r), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tile_row(r), acc(r);
      for (int64_t o = begin; o < end; ++o) {
        const acc_t* bk = bp + (o / r) * r * r;
        const acc_t* b_row_a = bk + (o % r) * r;
        for (int64_t j = 0; j * r < in; ++j) {
          const scalar_t* w = wp + o * in + j * r;
          // Load the whole tile row before writing: `out` may be `weight` (in-place merge).
          for (int64_t c = 0; c < r; ++c) tile_row[c] = static_cast<acc_t>(w[c]);
          for (int64_t b = 0; b < r; ++b) acc[b] = tile_row[b] + b_row_a[b];
          for (int64_t c = 0; c < r; ++c) {
            const acc_t wc = tile_row[c];
            const acc_t* bc = bk + c * r;
            for (int64_t b = 0; b < r; ++b) acc[b] += wc * bc[b];
          }
          scalar_t* dst = op + o * in + j * r;
          for (int64_t b = 0; b < r; ++b) dst[b] = static_cast<scalar_t>(acc[b]);
        }
      }
    });
  });
}

void bat_block_grad(const at::Tensor& grad_weight, const at::Tensor& weight,
                    at::Tensor& grad_block) {
  const int64_t in = weight.size(1), r = grad_block.size(-1), blocks = grad_block.size(0);
  if (grad_block.numel() == 0) return;
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_block_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const acc_t* gp = grad_weight.const_data_ptr<acc_t>();
    acc_t* dp = grad_block.data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> w_row(r);
      for (int64_t k = begin; k < end; ++k) {
        acc_t* acc = dp + k * r * r;
        std::fill(acc, acc + r * r, acc_t(0));
        for (int64_t a = 0; a < r; ++a) {
          const int64_t o = k * r + a;
          for (int64_t j = 0; j * r < in; ++j) {
            for (int64_t c = 0; c < r; ++c) w_row[c] = static_cast<acc_t>(wp[o * in + j * r + c]);
            const acc_t* g_row = gp + o * in + j * r;
            // dB_k += W_kj[a, :]^T G_kj[a, :] (rank one) and dB_k[a, :] += G_kj[a, :].
            for (int64_t c = 0; c < r; ++c) {
              const acc_t wc = w_row[c];
              acc_t* acc_c = acc + c * r;
              for (int64_t b = 0; b < r; ++b) acc_c[b] += wc * g_row[b];
            }
            acc_t* acc_a = acc + a * r;
            for (int64_t b = 0; b < r; ++b) acc_a[b] += g_row[b];
          }
        }
      }
    });
  });
}

void bat_weight_grad(const at::Tensor& grad_weight, const at::Tensor& block_acc, at::Tensor& out) {
  const int64_t rows = grad_weight.size(0), in = grad_weight.size(1), r = block_acc.size(-1);
  if (grad_weight.numel() == 0) return;
  // (G B^T)[c] = sum_b G[b] B[c, b] reads B by columns: transpose the small block once.
  const at::Tensor block_t = block_acc.transpose(1, 2).contiguous();
  MISS_DISPATCH_FLOAT(grad_weight.scalar_type(), "miss_bat_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bt = block_t.const_data_ptr<acc_t>();
    const scalar_t* gp = grad_weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(in, r), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g_row(r), acc(r);
      for (int64_t o = begin; o < end; ++o) {
        const acc_t* btk = bt + (o / r) * r * r;
        for (int64_t j = 0; j * r < in; ++j) {
          const scalar_t* g = gp + o * in + j * r;
          for (int64_t c = 0; c < r; ++c) acc[c] = g_row[c] = static_cast<acc_t>(g[c]);
          for (int64_t b = 0; b < r; ++b) {
            const acc_t gb = g_row[b];
            const acc_t* btb = btk + b * r;  // row b of B_k^T = column b of B_k
            for (int64_t c = 0; c < r; ++c) acc[c] += gb * btb[c];
          }
          scalar_t* dst = op + o * in + j * r;
          for (int64_t c = 0; c < r; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
}

void bat_unmerge(at::Tensor& weight, const at::Tensor& block_acc, const at::Tensor& inverse) {
  const int64_t rows = weight.size(0), in = weight.size(1), r = block_acc.size(-1);
  if (weight.numel() == 0) return;
  const double* ip = inverse.const_data_ptr<double>();
  MISS_DISPATCH_FLOAT(weight.scalar_type(), "miss_bat_unmerge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = block_acc.const_data_ptr<acc_t>();
    scalar_t* wp = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_grain(in, r), [&](int64_t begin, int64_t end) {
      // float64 here: the inverse amplifies rounding by cond(I + B_k), and unmerge must return
      // W within rounding of what was merged.
      std::vector<double> shifted(r), acc(r);
      for (int64_t o = begin; o < end; ++o) {
        const int64_t k = o / r;
        const acc_t* b_row_a = bp + k * r * r + (o % r) * r;
        const double* inv_k = ip + k * r * r;
        for (int64_t j = 0; j * r < in; ++j) {
          scalar_t* w = wp + o * in + j * r;
          for (int64_t c = 0; c < r; ++c) {
            shifted[c] = static_cast<double>(static_cast<acc_t>(w[c])) - b_row_a[c];
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t c = 0; c < r; ++c) {
            const double sc = shifted[c];
            const double* inv_c = inv_k + c * r;
            for (int64_t b = 0; b < r; ++b) acc[b] += sc * inv_c[b];
          }
          for (int64_t b = 0; b < r; ++b) w[b] = static_cast<scalar_t>(static_cast<acc_t>(acc[b]));
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace miss
