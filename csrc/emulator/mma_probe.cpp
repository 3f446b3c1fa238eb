// torch.ops.miss_emulated_cuda.mma_probe(a, b): one warp computes a @ b (a [16, 16] and b
// [16, 8] in bfloat16, the result in float32) with the emulated mma.sync, each lane loading
// and storing the elements the PTX ISA assigns it. The fragment layout is written here
// element by element, as the ISA states it ("Matrix Fragments for mma.m16n8k16 with floating
// point type"), independently of the emulator's (which inverts it) and of the kernels' (which
// load pairs), so that a test comparing with a @ b checks the emulator against the ISA and a
// kernel passing under the emulator is right on the hardware too.
#define MISS_EMULATE_CUDA
#include <torch/csrc/stable/ops.h>

#include "../aten_calls.h"
#include "../cuda/device_api.cuh"

namespace miss {
namespace {

using device::gptr;

uint16_t bits_of(BFloat16 v) {
  uint16_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

MISS_GLOBAL void mma_probe_kernel(gptr<const BFloat16> a, gptr<const BFloat16> b, gptr<float> d) {
  const int64_t lane = threadIdx.x, group = lane >> 2, in_group = lane % 4;
  uint32_t a_regs[4] = {0, 0, 0, 0}, b_regs[2] = {0, 0};
  for (int64_t i = 0; i < 8; ++i) {  // a0 .. a7, two to a register, low half first
    const int64_t row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
    const int64_t col = in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    a_regs[i / 2] |= static_cast<uint32_t>(bits_of(a[row * 16 + col])) << (16 * (i % 2));
  }
  for (int64_t i = 0; i < 4; ++i) {  // b0 .. b3
    const int64_t row = in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0), col = group;
    b_regs[i / 2] |= static_cast<uint32_t>(bits_of(b[row * 8 + col])) << (16 * (i % 2));
  }
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  device::mma_m16n8k16_bf16(a_regs, b_regs, c);
  for (int64_t i = 0; i < 4; ++i) {  // c0 .. c3
    const int64_t row = i < 2 ? group : group + 8, col = in_group * 2 + (i & 1);
    d[row * 8 + col] = c[i];
  }
}

}  // namespace

Tensor mma_probe(const Tensor& a, const Tensor& b) {
  MISS_CHECK(a.scalar_type() == kBFloat16 && a.dim() == 2 && a.size(0) == 16 && a.size(1) == 16,
             "miss_emulated_cuda.mma_probe: argument 'a' must be bfloat16 [16, 16], got ", a.scalar_type(), " ",
             a.sizes());
  MISS_CHECK(b.scalar_type() == kBFloat16 && b.dim() == 2 && b.size(0) == 16 && b.size(1) == 8,
             "miss_emulated_cuda.mma_probe: argument 'b' must be bfloat16 [16, 8], got ", b.scalar_type(), " ",
             b.sizes());
  const Tensor a_c = aten::contiguous(a), b_c = aten::contiguous(b);
  Tensor d = aten::empty({16, 8}, kFloat, a.device());
  const auto pa = device::input<BFloat16>(a_c, "a");
  const auto pb = device::input<BFloat16>(b_c, "b");
  const auto pd = device::output<float>(d, "d");
  MISS_LAUNCH(mma_probe_kernel, 1, 32, pa, pb, pd);
  return d;
}

}  // namespace miss
