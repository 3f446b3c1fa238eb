// What the tensor-core kernels (bat_kernels.cuh, bat_grad_kernels.cuh) share: the shape of
// one mma.sync.m16n8k16 (device_api.cuh mma_m16n8k16_bf16) and the padding of the r x r tiles
// they stage in shared memory. A fragment load reads 8 rows at one column; with r = 64
// unpadded those rows would fall in the same banks, 8 elements more per row spread them.
#pragma once

#include <cstdint>

namespace miss {
namespace MISS_CUDA_NAMESPACE {

constexpr int kMmaRows = 16;  // rows of a warp's A fragment and of its output
constexpr int kMmaCols = 8;   // columns of an mma's output
constexpr int kMmaDepth = 16;  // the contracted dimension of one mma
constexpr int kTilePad = 8;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace MISS_CUDA_NAMESPACE
}  // namespace miss
