// The ATen ops the op bodies call, through the stable ABI (torch_api.h). Most go through the
// dispatcher by name (torch_call_dispatcher), exactly as at::mm(...) does, so the profiler
// records them as "aten::<op>" with their shapes.
//
// The dispatcher of the stable ABI cannot pass a Scalar argument (no StableIValue conversion
// for it up to torch 2.15), so ops with beta/alpha (addmm_, baddbmm) run through the AOTI
// device shims aoti_torch_{cpu,cuda}_*_out: the same structured kernels, called below the
// dispatcher, inside a profiler range of the op's name. A + B becomes A - (-1) * B
// (aten::sub runs the kernel of aten::add with -alpha: the same bits).
#pragma once

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#ifdef MISS_WITH_CUDA
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#endif

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "torch_api.h"

namespace miss {
namespace aten {

using torch::stable::copy_;
using torch::stable::full;
using torch::stable::subtract;
using torch::stable::sum;
using torch::stable::sum_out;

namespace detail {
using torch::stable::detail::from;
using torch::stable::detail::to;

template <typename... Args>
auto stack_of(const Args&... args) {
  return std::array<StableIValue, sizeof...(Args)>{from(args)...};
}

template <size_t N>
void call(const char* op, const char* overload, std::array<StableIValue, N>& stack) {
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
}

template <typename... Args>
Tensor call_tensor(const char* op, const char* overload, const Args&... args) {
  auto stack = stack_of(args...);
  call(op, overload, stack);
  return to<Tensor>(stack[0]);
}

// An out= op: the stack's result is `out` itself (a second handle to it), dropped here.
template <typename... Args>
void call_out(const char* op, const char* overload, const Args&... args) {
  auto stack = stack_of(args...);
  call(op, overload, stack);
  (void)to<Tensor>(stack[0]);
}
}  // namespace detail

// --- Allocation, views and conversions ---------------------------------------------------
// Each dispatcher call of the stable ABI looks the op up by name and boxes its arguments
// (~1.5 us on the CPU of benchmarks/host_overhead.py), where libtorch's C++ API used a cached
// handle. The op bodies make a few dozen such calls per layer step, so the ones that need no
// kernel are made without the dispatcher: allocation through torch's C shim, views as
// strided reinterpretations of the same storage, and conversions that would return their
// input (same dtype, already contiguous) not made at all. None of these are GPU work.

namespace detail {
inline std::vector<int64_t> contiguous_strides(IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  return strides;
}
// A view of t's storage with these sizes and strides, starting `offset` elements after t's
// first element (the shim takes an increment of t's storage offset).
inline Tensor strided_view(const Tensor& t, IntArrayRef sizes, IntArrayRef strides, int64_t offset = 0) {
  AtenTensorHandle view = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(t.get(), static_cast<int64_t>(sizes.size()), sizes.data(),
                                                        strides.data(), offset, &view));
  return Tensor(view);
}
inline int64_t wrap_dim(int64_t dim, int64_t ndim) { return dim < 0 ? dim + ndim : dim; }
}  // namespace detail

// An uninitialised contiguous tensor.
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, const torch::stable::Device& device) {
  const std::vector<int64_t> strides = detail::contiguous_strides(sizes);
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), detail::to<int32_t>(detail::from(dtype)),
      detail::to<int32_t>(detail::from(device.type())), device.index() < 0 ? 0 : device.index(), &out));
  return Tensor(out);
}

// A contiguous uninitialised tensor of t's shape, dtype and device.
inline Tensor empty_contiguous_like(const Tensor& t) { return aten::empty(t.sizes(), t.scalar_type(), t.device()); }
inline Tensor zeros(IntArrayRef sizes, ScalarType dtype, const torch::stable::Device& device) {
  Tensor out = aten::empty(sizes, dtype, device);
  torch::stable::fill_(out, 0.0);
  return out;
}

inline Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor to(const Tensor& t, ScalarType dtype, bool copy = false) {
  if (!copy && t.scalar_type() == dtype) return t;
  return torch::stable::to(t, dtype, std::nullopt, std::nullopt, std::nullopt, /*non_blocking=*/false, copy);
}
inline Tensor to(const Tensor& t, const torch::stable::Device& device) { return torch::stable::to(t, device); }

inline Tensor transpose(const Tensor& t, int64_t dim0, int64_t dim1) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end()), strides(t.strides().begin(), t.strides().end());
  dim0 = detail::wrap_dim(dim0, t.dim());
  dim1 = detail::wrap_dim(dim1, t.dim());
  std::swap(sizes[dim0], sizes[dim1]);
  std::swap(strides[dim0], strides[dim1]);
  return detail::strided_view(t, sizes, strides);
}
inline Tensor t(const Tensor& a) { return aten::transpose(a, 0, 1); }
// Rows [start, start + length) of dim (a view).
inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  dim = detail::wrap_dim(dim, t.dim());
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes[dim] = length;
  return detail::strided_view(t, sizes, t.strides(), start * t.stride(dim));
}
// Entry `index` of dim (a view with that dim dropped).
inline Tensor select(const Tensor& t, int64_t dim, int64_t index) {
  dim = detail::wrap_dim(dim, t.dim());
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end()), strides(t.strides().begin(), t.strides().end());
  const int64_t offset = index * strides[dim];
  sizes.erase(sizes.begin() + dim);
  strides.erase(strides.begin() + dim);
  return detail::strided_view(t, sizes, strides, offset);
}
// t with another shape: a view of a contiguous t (aten::view otherwise, which checks that the
// strides allow it).
inline Tensor view(const Tensor& t, IntArrayRef sizes) {
  if (!t.is_contiguous()) return torch::stable::view(t, sizes);
  return detail::strided_view(t, sizes, detail::contiguous_strides(sizes));
}
// A view when t is contiguous, else aten::reshape (which may copy).
inline Tensor reshape(const Tensor& t, IntArrayRef sizes) {
  return t.is_contiguous() ? aten::view(t, sizes) : torch::stable::reshape(t, sizes);
}

// --- Computation ------------------------------------------------------------------------

inline Tensor mm(const Tensor& a, const Tensor& b) { return detail::call_tensor("aten::mm", "", a, b); }
// a @ b written in out_dtype (float32 from bf16/fp16 operands on CUDA: aten::mm.dtype).
inline Tensor mm(const Tensor& a, const Tensor& b, ScalarType out_dtype) {
  return detail::call_tensor("aten::mm", "dtype", a, b, out_dtype);
}
inline void mm_out(Tensor& out, const Tensor& a, const Tensor& b) { detail::call_out("aten::mm", "out", a, b, out); }
inline Tensor bmm(const Tensor& a, const Tensor& b) { return detail::call_tensor("aten::bmm", "", a, b); }
inline Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  return detail::call_tensor("aten::linear", "", x, weight, bias);
}
inline Tensor abs(const Tensor& a) { return detail::call_tensor("aten::abs", "", a); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return detail::call_tensor("aten::mul", "Tensor", a, b); }
inline Tensor isfinite(const Tensor& a) { return detail::call_tensor("aten::isfinite", "", a); }
inline Tensor all(const Tensor& a) { return detail::call_tensor("aten::all", "", a); }
// A contiguous copy of a, whatever a's layout (clone's default keeps a's strides).
inline Tensor clone_contiguous(const Tensor& a) {
  return detail::call_tensor("aten::clone", "", a, std::optional<torch::headeronly::MemoryFormat>(
                                                       torch::headeronly::MemoryFormat::Contiguous));
}
inline Tensor eye(int64_t n, ScalarType dtype, const torch::stable::Device& device) {
  return detail::call_tensor("aten::eye", "", n, std::optional<ScalarType>(dtype),
                             std::optional<torch::headeronly::Layout>(), std::optional<torch::stable::Device>(device),
                             std::optional<bool>());
}
// (inverse, info) of every matrix of a batch.
inline std::tuple<Tensor, Tensor> linalg_inv_ex(const Tensor& a) {
  auto stack = detail::stack_of(a, false);
  detail::call("aten::linalg_inv_ex", "", stack);
  return {detail::to<Tensor>(stack[0]), detail::to<Tensor>(stack[1])};
}
// a + b, as a - (-1) * b.
inline Tensor add(const Tensor& a, const Tensor& b) { return aten::subtract(a, b, -1.0); }
// dst += src (src broadcast to dst), in place: one temporary of dst's shape.
inline void add_(Tensor& dst, const Tensor& src) { aten::copy_(dst, aten::subtract(dst, src, -1.0)); }

// Calls torch's C shim aoti_torch_{cuda,cpu}_<NAME> for the device of `out` with beta =
// alpha = 1 after the tensor arguments (the callers open the profiler range of the op).
#ifdef MISS_WITH_CUDA
#define MISS_GEMM_SHIM(NAME, out, ...)                                                            \
  TORCH_ERROR_CODE_CHECK((out).is_cuda() ? aoti_torch_cuda_##NAME((out).get(), __VA_ARGS__, 1.0, 1.0) \
                                         : aoti_torch_cpu_##NAME((out).get(), __VA_ARGS__, 1.0, 1.0))
#else
#define MISS_GEMM_SHIM(NAME, out, ...) \
  TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_##NAME((out).get(), __VA_ARGS__, 1.0, 1.0))
#endif

// y += a @ b in place (aten::addmm_ with beta = alpha = 1).
inline void addmm_(Tensor& y, const Tensor& a, const Tensor& b) {
  const ProfilerRange range("aten::addmm_", {&y, &a, &b});
  MISS_GEMM_SHIM(addmm_out, y, y.get(), a.get(), b.get());
}

// out = self + a @ b, self broadcast to out (aten::addmm with beta = alpha = 1; a 1-D self
// is a bias: cuBLASLt adds it in the GEMM's epilogue).
inline void addmm_out(Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b) {
  const ProfilerRange range("aten::addmm", {&self, &a, &b});
  MISS_GEMM_SHIM(addmm_out, out, self.get(), a.get(), b.get());
}

// out = self + b1 @ b2 per batch entry (aten::baddbmm).
inline void baddbmm_out(Tensor& out, const Tensor& self, const Tensor& b1, const Tensor& b2) {
  const ProfilerRange range("aten::baddbmm", {&self, &b1, &b2});
  MISS_GEMM_SHIM(baddbmm_out, out, self.get(), b1.get(), b2.get());
}
inline Tensor baddbmm(const Tensor& self, const Tensor& b1, const Tensor& b2) {
  Tensor out = aten::empty({b1.size(0), b1.size(1), b2.size(2)}, self.scalar_type(), self.device());
  baddbmm_out(out, self, b1, b2);
  return out;
}

}  // namespace aten
}  // namespace miss
