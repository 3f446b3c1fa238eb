// The one place that declares the miss op API: every schema, with mutation annotated, and
// the kernels registered for the CPU and CUDA dispatch keys. Fake (meta) kernels and
// autograd are registered from Python, in miss_ext/ops.py.
//
// Shapes: x [..., in]; weight [out, in]; N = rows of x (its leading dims flattened).
// Block: standard [r, out], mini [r, mini_r], bat [out / r, r, r].
// Dropout: p in [0, 1] and a one-element int64 seed tensor (needed when p > 0); the mask is
// a function of (seed, row, column) only (csrc/philox_dropout.h), so backward regenerates it.
#include "registration.h"

#include "ops/ops.h"

#ifdef MISS_PYTHON_MODULE
#include <Python.h>

// Importing miss_ext._C loads this library and so runs the registrations below; the module
// itself is empty (no pybind11: the ops are reached through torch.ops.miss).
// PyMODINIT_FUNC: extern "C" and exported, although the library is built -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace miss {

void define_schemas(torch::stable::detail::StableLibrary& m) {
  // fold[n, c] = sum over i % r == c of drop(x)[n, i], float32 [N, r].
  m.def("shard_fold(Tensor x, int r, float p=0., Tensor? seed=None) -> Tensor");
  // grad_x + drop(n, i) * g[n, i % r]: the adjoint of shard_fold added to grad_x.
  m.def("shard_tile_add(Tensor grad_x, Tensor g, float p=0., Tensor? seed=None) -> Tensor");
  // (x W^T + bias + (fold @ block)[n, o % m], fold): the adapted layer, standard or mini.
  m.def(
      "shard_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block, float p=0., "
      "Tensor? seed=None) -> (Tensor, Tensor)");
  // (y + (fold @ block)[n, o % m], fold): one more standard/mini adapter on a layer output.
  m.def(
      "shard_delta_add(Tensor y, Tensor x, Tensor block, float p=0., Tensor? seed=None) -> "
      "(Tensor, Tensor)");
  // (grad_x, grad_block) of shard_linear (weight given) or shard_delta_add (weight None);
  // grad_fold, when given, is the gradient reaching the fold output. Outputs not asked for
  // in output_mask come back empty.
  m.def(
      "shard_linear_backward(Tensor grad_out, Tensor fold, Tensor? weight, Tensor block, "
      "int in_features, float p, Tensor? seed, Tensor? grad_fold, bool[2] output_mask) -> "
      "(Tensor, Tensor)");
  // W'_kj = W_kj + W_kj B_k + B_k for every r x r tile.
  m.def("bat_weight(Tensor weight, Tensor block) -> Tensor");
  // dB_k = sum_j W_kj^T G_kj + G_kj (float32), G the gradient with respect to W'.
  m.def("bat_block_grad(Tensor grad_weight, Tensor weight, int r) -> Tensor");
  // dW_kj = G_kj (I + B_k)^T, G the gradient with respect to W'.
  m.def("bat_weight_grad(Tensor grad_weight, Tensor block) -> Tensor");
  // x W'^T + bias, with W' = bat_weight(weight, block) built and dropped (not kept).
  m.def("bat_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block) -> Tensor");
  // (grad_x, grad_weight, grad_block) of bat_linear; W' is rebuilt, not saved.
  m.def(
      "bat_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor block, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // weight += delta of the block (any variant), in place; check_finite refuses, before any
  // write, a merge that would produce NaN or Inf.
  m.def("merge_(Tensor(a!) weight, Tensor block, bool check_finite=False) -> ()");
  // The inverse of merge_; a bat unmerge refuses a singular or ill-conditioned I + B_k.
  m.def("unmerge_(Tensor(a!) weight, Tensor block) -> ()");
}

}  // namespace miss

STABLE_TORCH_LIBRARY(miss, m) { miss::define_schemas(m); }

#define MISS_IMPL_OP(name) m.impl(#name, TORCH_BOX(&miss::name));
#define MISS_REGISTER_KERNELS(m) MISS_FOR_EACH_OP(MISS_IMPL_OP)

// The op bodies are device-generic (they route to miss::cpu or miss::cuda kernels by the
// device of their tensors), so both keys register the same functions.
STABLE_TORCH_LIBRARY_IMPL(miss, CPU, m) { MISS_REGISTER_KERNELS(m) }

#ifdef MISS_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(miss, CUDA, m) { MISS_REGISTER_KERNELS(m) }
#endif
