// What csrc/ takes from torch: only the LibTorch stable ABI (torch/csrc/stable, the AOTI C
// shims, torch/headeronly). No libtorch C++ symbol is linked, so one build loads on every
// torch from the version it targets on (setup.py: TORCH_TARGET_VERSION, torch 2.11) and
// tests/test_stable_abi.py checks that the library references none.
//
// Here: the tensor and dtype types, errors (MISS_CHECK), printing of shapes, dtypes and
// devices in those errors, the kernels' accumulation type, dtype dispatch, item(), the device
// guard of the op bodies and named profiler ranges. ATen calls are in aten_calls.h.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace miss {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;

// --- Errors ---------------------------------------------------------------------------
// Messages are built from the arguments as torch's TORCH_CHECK builds them, and thrown as
// std::runtime_error (Python: RuntimeError), without the file and line prefix that the
// stable ABI's STD_TORCH_CHECK adds: users read these.
namespace detail {

inline void put(std::ostringstream& os, IntArrayRef values) {
  os << '[';
  for (size_t i = 0; i < values.size(); ++i) os << (i ? ", " : "") << values[i];
  os << ']';
}
inline void put(std::ostringstream& os, ScalarType t) { os << torch::headeronly::toString(t); }
inline void put(std::ostringstream& os, const torch::stable::Device& d) {
  switch (d.type()) {
    case torch::headeronly::DeviceType::CPU: os << "cpu"; break;
    case torch::headeronly::DeviceType::CUDA: os << "cuda"; break;
    case torch::headeronly::DeviceType::Meta: os << "meta"; break;
    default: os << "device type " << static_cast<int>(d.type()); break;
  }
  if (d.has_index()) os << ':' << static_cast<int>(d.index());
}
template <typename T>
void put(std::ostringstream& os, const T& value) {
  os << value;
}

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  (put(os, args), ...);
  return os.str();
}

}  // namespace detail

#define MISS_CHECK(cond, ...)                                              \
  do {                                                                     \
    if (!(cond)) throw std::runtime_error(::miss::detail::message(__VA_ARGS__)); \
  } while (0)

// A broken invariant of this library (not of the caller's input).
#define MISS_INTERNAL_ASSERT(cond)                                                             \
  MISS_CHECK(cond, "miss internal error: ", #cond, " failed at ", __FILE__, ":", __LINE__,  \
             "; please report it")

// --- Kernel types ---------------------------------------------------------------------
// The type a kernel accumulates in for data of type T (ATen's opmath_type): float for the
// 16-bit floats, T otherwise.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// Runs BODY (a lambda) with scalar_t the C++ type of TYPE, one of the four float dtypes.
#define MISS_DISPATCH_CASE(ENUM, CPP_TYPE, ...) \
  case ENUM: {                                  \
    using scalar_t = CPP_TYPE;                  \
    __VA_ARGS__();                              \
    break;                                      \
  }
#define MISS_DISPATCH_FLOAT(TYPE, NAME, ...)                                         \
  do {                                                                               \
    const ::miss::ScalarType miss_dispatch_type = (TYPE);                            \
    switch (miss_dispatch_type) {                                                    \
      MISS_DISPATCH_CASE(::miss::kFloat, float, __VA_ARGS__)                         \
      MISS_DISPATCH_CASE(::miss::kDouble, double, __VA_ARGS__)                       \
      MISS_DISPATCH_CASE(::miss::kHalf, ::miss::Half, __VA_ARGS__)                   \
      MISS_DISPATCH_CASE(::miss::kBFloat16, ::miss::BFloat16, __VA_ARGS__)           \
      default:                                                                       \
        MISS_CHECK(false, NAME, ": unsupported dtype ", miss_dispatch_type);         \
    }                                                                                \
  } while (0)

// --- Small tensor utilities -------------------------------------------------------------

// The value of a one-element tensor (a device tensor is synchronised and copied), through
// the shim of its C type.
namespace detail {
template <typename T, typename Shim>
T item_from(const Tensor& t, Shim shim) {
  T value{};
  TORCH_ERROR_CODE_CHECK(shim(t.get(), &value));
  return value;
}
}  // namespace detail
template <typename T>
T item(const Tensor& t);
template <>
inline int64_t item<int64_t>(const Tensor& t) { return detail::item_from<int64_t>(t, aoti_torch_item_int64); }
template <>
inline int32_t item<int32_t>(const Tensor& t) { return detail::item_from<int32_t>(t, aoti_torch_item_int32); }
template <>
inline double item<double>(const Tensor& t) { return detail::item_from<double>(t, aoti_torch_item_float64); }
template <>
inline bool item<bool>(const Tensor& t) { return detail::item_from<bool>(t, aoti_torch_item_bool); }

inline bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

// The current device set to t's while an op body runs, for CUDA tensors (as
// c10::OptionalDeviceGuard(device_of(t))). CPU tensors need none, and a CPU-only torch has no
// accelerator to guard.
class OptionalDeviceGuard {
 public:
  explicit OptionalDeviceGuard(const Tensor& t) {
    if (t.is_cuda()) guard_.emplace(t.get_device_index());
  }

 private:
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
};

// A named range in torch.profiler's trace (RECORD_FUNCTION), with the given tensors as its
// inputs so that record_shapes=True shows their shapes. `name` must outlive the range (the
// profiler keeps the pointer): pass a string literal. benchmarks/gpu_trace.py reads these
// names: the ATen GEMMs called through device shims below the dispatcher (aten_calls.h) and
// the emulator's kernel launches and cuBLAS stand-ins.
class ProfilerRange {
 public:
  ProfilerRange(const char* name, std::initializer_list<const Tensor*> inputs) {
    std::vector<C10IValueHandle> values;
    values.reserve(inputs.size());
    for (const Tensor* t : inputs) {
      C10IValueHandle value = nullptr;
      TORCH_ERROR_CODE_CHECK(aoti_torch_tensor_to_ivalue(t->get(), &value));
      values.push_back(value);
    }
    // The range copies its inputs; ours are freed right after.
    const AOTITorchError started = aoti_record_function_start(name, nullptr, values.data(), values.size(), &guard_);
    for (C10IValueHandle value : values) aoti_torch_delete_c10_value_object(value);
    TORCH_ERROR_CODE_CHECK(started);
  }
  ~ProfilerRange() {
    if (guard_ != nullptr) aoti_record_function_end(guard_);
  }
  ProfilerRange(const ProfilerRange&) = delete;
  ProfilerRange& operator=(const ProfilerRange&) = delete;

 private:
  AtenRecordFunctionHandle guard_ = nullptr;
};

}  // namespace miss
