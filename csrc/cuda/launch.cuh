// Launch helpers shared by the CUDA kernels: grid sizing for grid-stride loops over int64
// element counts, the current stream, and the launch check every kernel launch is followed by.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace miss {
namespace cuda {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU a few times over; grid-stride loops cover the rest, so no
// element count overflows a 32-bit grid dimension.
inline unsigned int blocks_for(int64_t elements) {
  const int64_t needed = (elements + kThreads - 1) / kThreads;
  const int64_t cap = int64_t{32} * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace miss

// Every launch is followed by this: a bad configuration fails here, named, not later.
#define MISS_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Grid-stride loop over [0, n) with a 64-bit index.
#define MISS_GRID_STRIDE_LOOP(index, n)                                                   \
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;     \
       index < (n); index += static_cast<int64_t>(blockDim.x) * gridDim.x)
