// Kernels with a known bug, one per check of the emulator, run by
// torch.ops.miss_emulated_cuda.planted_bug(out, kind): a test that expects each to be
// reported proves that the checks can fail. `out` is a float32 tensor of at least 512
// elements; the kernels are written with the same layer (device_api.cuh) as the real ones.
#define MISS_EMULATE_CUDA
#include <string>

#include <torch/csrc/stable/ops.h>

#include "../cuda/device_api.cuh"

namespace miss {
namespace {

using device::gptr;

// Every thread writes out[0]: a write-write race between threads of one block.
MISS_GLOBAL void same_element_kernel(gptr<float> out) { out[0] = static_cast<float>(threadIdx.x); }

// Block b writes out[0..255]; blocks are never ordered with each other: a race across blocks.
MISS_GLOBAL void blocks_overlap_kernel(gptr<float> out) { out[threadIdx.x] = static_cast<float>(blockIdx.x); }

// A shared array read by a neighbour before the barrier that would order it.
MISS_GLOBAL void missing_barrier_kernel(gptr<float> out) {
  MISS_SHARED_ARRAY(float, staged, 256);
  staged[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = staged[(threadIdx.x + 1) % 256];  // no MISS_SYNC_THREADS() before this read
  MISS_SYNC_THREADS();
}

// The last thread writes one element past the end.
MISS_GLOBAL void past_the_end_kernel(gptr<float> out, int64_t n) {
  out[threadIdx.x + (threadIdx.x == blockDim.x - 1 ? n - 255 : 0)] = 1.0f;
}

// A shared slot read that nothing wrote.
MISS_GLOBAL void unwritten_shared_kernel(gptr<float> out) {
  MISS_SHARED_ARRAY(float, staged, 256);
  if (threadIdx.x > 0) staged[threadIdx.x] = 1.0f;
  MISS_SYNC_THREADS();
  out[threadIdx.x] = staged[0];
}

// Half the threads leave before the barrier the others wait at.
MISS_GLOBAL void divergent_barrier_kernel(gptr<float> out) {
  out[threadIdx.x] = 1.0f;
  if (threadIdx.x % 2 == 0) return;
  MISS_SYNC_THREADS();
}

// A 16-byte vector load from a pointer one float past an aligned one.
MISS_GLOBAL void misaligned_kernel(gptr<float> out) {
  const device::Pack<float, 4> pack = device::load_pack<4>(gptr<const float>(out) + 1);
  out[threadIdx.x] = pack.v[0];
}

// Half a warp reaches a warp-wide mma.sync, the other half exits: a hang on a GPU.
MISS_GLOBAL void mma_divergence_kernel(gptr<float> out) {
  out[threadIdx.x] = 1.0f;
  if (threadIdx.x % 32 >= 16) return;
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  device::mma_m16n8k16_bf16(a, b, c);
}

// A block of 48 threads: its second warp has 16 lanes, too few for mma.sync.
MISS_GLOBAL void mma_partial_warp_kernel(gptr<float> out) {
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  device::mma_m16n8k16_bf16(a, b, c);
  out[threadIdx.x] = c[0];
}

}  // namespace

void planted_bug(Tensor& out, const std::string& kind) {
  MISS_CHECK(out.scalar_type() == kFloat && out.is_contiguous() && out.numel() >= 512,
              "miss_emulated_cuda.planted_bug: argument 'out' must be a contiguous float32 tensor of at least 512 "
              "elements, got ", out.scalar_type(), " ", out.sizes());
  const int64_t n = out.numel();
  if (kind == "partial_output") {  // writes 256 of the n elements it declares as its output
    const auto p = device::output<float>(out, "out");
    MISS_LAUNCH(blocks_overlap_kernel, 1, 256, p);
    return;
  }
  torch::stable::fill_(out, 0.0);
  const auto p = device::inout<float>(out, "out");
  if (kind == "write_write") {
    MISS_LAUNCH(same_element_kernel, 1, 256, p);
  } else if (kind == "across_blocks") {
    MISS_LAUNCH(blocks_overlap_kernel, 2, 256, p);
  } else if (kind == "missing_barrier") {
    MISS_LAUNCH(missing_barrier_kernel, 1, 256, p);
  } else if (kind == "out_of_bounds") {
    MISS_LAUNCH(past_the_end_kernel, 1, 256, p, n);
  } else if (kind == "unwritten_shared") {
    MISS_LAUNCH(unwritten_shared_kernel, 1, 256, p);
  } else if (kind == "divergent_barrier") {
    MISS_LAUNCH(divergent_barrier_kernel, 1, 256, p);
  } else if (kind == "misaligned") {
    MISS_LAUNCH(misaligned_kernel, 1, 256, p);
  } else if (kind == "mma_divergence") {
    MISS_LAUNCH(mma_divergence_kernel, 1, 64, p);
  } else if (kind == "mma_partial_warp") {
    MISS_LAUNCH(mma_partial_warp_kernel, 1, 48, p);
  } else {
    MISS_CHECK(false, "miss_emulated_cuda.planted_bug: unknown kind '", kind, "'");
  }
}

}  // namespace miss
