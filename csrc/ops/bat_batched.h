// The BAT tile products as batched GEMMs through ATen, on every device: MKL on the CPU,
// cuBLAS on CUDA, the CPU's GEMMs on the emulated CUDA device. One formulation serves all:
// the r x r products are small GEMMs that a library runs far better than a loop (a
// hand-written loop on the CPU ran without FMA vectorisation several times slower than MKL;
// the one-thread-per-element CUDA kernels it replaced read each operand r times).
#pragma once

#include "../torch_api.h"

namespace miss {
namespace bat_batched {

// out_kj = W_kj + W_kj B_k + B_k; out may be weight itself (in-place merge).
void transform(const Tensor& weight, const Tensor& block_acc, Tensor& out);
// grad_block_k (+)= sum_j W_kj^T G_kj + G_kj over the tiles of weight (a column slab of W
// and of G will do): added into grad_block when accumulate. G and grad_block in the acc dtype
// of W.
void block_grad(const Tensor& grad_weight, const Tensor& weight, Tensor& grad_block, bool accumulate = false);
// out_kj = G_kj (I + B_k)^T, the gradient of transform with respect to W.
void weight_grad(const Tensor& grad_weight, const Tensor& block_acc, Tensor& out);
// W_kj <- (W_kj - B_k) inverse_k, inverse_k = inv(I + B_k) in float64 (the unmerge of every
// case the tensor-core kernel bat_untransform_mma does not take).
void unmerge(Tensor& weight, const Tensor& block_acc, const Tensor& inverse);

}  // namespace bat_batched
}  // namespace miss
