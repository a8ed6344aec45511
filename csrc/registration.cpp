// The operator schemas of the `uxnet` namespace: one TORCH_LIBRARY block for every op.
// Device implementations live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL per device); fake (meta)
// implementations and autograd are registered from Python (uxnet_kernels/ops/<op>.py).
#include <torch/library.h>

#include "uxnet_ops.h"

#ifdef UXNET_PYTHON_EXTENSION
#include <Python.h>

#include "cpu/conv3d_3x3x3/driver.h"
#include "cpu/conv3d_3x3x3/params.h"
#include "cpu/simd/isa.h"

namespace {

PyObject* string_list(const std::vector<std::string>& items) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(items.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    PyObject* item = PyUnicode_FromString(items[i].c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

// _C.cpu_isa() -> {"requested", "selected", "error", "available", "unavailable"} (uxnet::cpu::simd::isa_report).
PyObject* cpu_isa(PyObject*, PyObject*) {
  const uxnet::cpu::simd::IsaReport report = uxnet::cpu::simd::isa_report();
  PyObject* available = string_list(report.available);
  PyObject* unavailable = string_list(report.unavailable);
  PyObject* result = (available != nullptr && unavailable != nullptr)
                         ? Py_BuildValue("{s:s,s:s,s:s,s:O,s:O}", "requested", report.requested.c_str(),
                                         "selected", report.selected.c_str(), "error", report.error.c_str(),
                                         "available", available, "unavailable", unavailable)
                         : nullptr;
  Py_XDECREF(available);
  Py_XDECREF(unavailable);
  return result;
}

// _C.conv3d_3x3x3_columns(float64: bool) -> int: the column-panel width of conv3d_3x3x3's packed weights on the
// selected ISA (the last dimension of uxnet::conv3d_3x3x3_pack_weight's result).
PyObject* conv3d_3x3x3_columns(PyObject*, PyObject* float64) {
  namespace conv = uxnet::cpu::conv3d_3x3x3;
  try {
    const uxnet::cpu::simd::Isa isa = uxnet::cpu::simd::selected_isa();
    return PyLong_FromLongLong(PyObject_IsTrue(float64) ? conv::kernels_f64(isa).cols : conv::kernels_f32(isa).cols);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// _C.conv3d_3x3x3_few_tiles_large_filter(n, d, h, w, c_out, c_in, element_size) -> bool: few tiles with a large
// transformed filter, where the CPU op streams a float32 filter per call (a packed weight does not pay) and runs
// ATen's bf16 convolution for bfloat16 without a packed weight.
PyObject* conv3d_3x3x3_few_tiles_large_filter(PyObject*, PyObject* args) {
  long long n, d, h, w, cout, cin, element_size;
  if (!PyArg_ParseTuple(args, "LLLLLLL", &n, &d, &h, &w, &cout, &cin, &element_size)) return nullptr;
  return PyBool_FromLong(uxnet::cpu::conv3d_3x3x3::few_tiles_large_filter(n, d, h, w, cout, cin, element_size));
}

// _C.conv3d_3x3x3_bf16_products() -> bool: whether bfloat16 inputs run bf16 products (vdpbf16ps, or its emulation
// on avx512-emulated) on the selected ISA; their packed weights are then bf16 pairs.
PyObject* conv3d_3x3x3_bf16_products(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(uxnet::cpu::conv3d_3x3x3::bf16_products());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU kernels' ISA variants: requested, selected, available."},
    {"conv3d_3x3x3_columns", conv3d_3x3x3_columns, METH_O,
     "Column-panel width of conv3d_3x3x3's packed weights on the selected ISA (argument: float64 weights)."},
    {"conv3d_3x3x3_bf16_products", conv3d_3x3x3_bf16_products, METH_NOARGS,
     "Whether bfloat16 inputs of the CPU conv3d_3x3x3 run bf16 products on the selected ISA."},
    {"conv3d_3x3x3_few_tiles_large_filter", conv3d_3x3x3_few_tiles_large_filter, METH_VARARGS,
     "Whether (n, d, h, w, c_out, c_in, element_size) has few tiles with a large transformed filter."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import uxnet_kernels._C` loads this shared object, which runs the static registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
#endif

namespace uxnet {

at::MemoryFormat suggested_memory_format(const at::Tensor& like) {
  if (like.dim() == 5 && !like.is_contiguous() &&
      like.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

int64_t voxels_per_batch(const at::Tensor& x) {
  return x.size(0) * x.size(2) * x.size(3) * x.size(4);
}

}  // namespace uxnet

TORCH_LIBRARY(uxnet, m) {
  m.def("dwconv3d(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "dwconv3d_backward(Tensor grad_out, Tensor x, Tensor weight, bool[3] output_mask)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("conv3d_3x3x3(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("conv3d_3x3x3_pack_weight(Tensor weight) -> Tensor");
  m.def("conv3d_3x3x3_packed(Tensor x, Tensor weight, Tensor packed_weight, Tensor? bias) -> Tensor");
  m.def(
      "conv3d_3x3x3_backward(Tensor grad_out, Tensor x, Tensor weight, bool[3] output_mask)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("layer_norm_channels_first(Tensor x, Tensor weight, Tensor bias, float eps)"
        " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_channels_first_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd,"
      " bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "ux_mlp(Tensor y, Tensor? residual, Tensor ln_weight, Tensor ln_bias, Tensor w1, Tensor b1,"
      " Tensor w2, Tensor b2, Tensor? gamma, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "ux_mlp_backward(Tensor grad_out, Tensor y, Tensor ln_weight, Tensor ln_bias, Tensor w1,"
      " Tensor b1, Tensor w2, Tensor b2, Tensor? gamma, Tensor mean, Tensor rstd)"
      " -> (Tensor grad_y, Tensor grad_ln_weight, Tensor grad_ln_bias, Tensor grad_w1,"
      " Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, Tensor grad_gamma)");
  m.def("instance_norm_lrelu(Tensor x, float negative_slope, float eps)"
        " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("instance_norm_lrelu_backward(Tensor grad_out, Tensor out, Tensor rstd, float negative_slope)"
        " -> Tensor grad_x");
  m.def(
      "instance_norm_add_lrelu(Tensor z, Tensor? residual, Tensor[] shortcut_inputs, Tensor[] shortcut_weights,"
      " float negative_slope, float eps)"
      " -> (Tensor out, Tensor mean, Tensor rstd, Tensor shortcut_mean, Tensor shortcut_rstd)");
  m.def(
      "instance_norm_add_lrelu_backward(Tensor grad_out, Tensor out, Tensor? residual, Tensor[] shortcut_inputs,"
      " Tensor[] shortcut_weights, Tensor rstd, Tensor shortcut_mean, Tensor shortcut_rstd, float negative_slope)"
      " -> (Tensor grad_z, Tensor grad_residual, Tensor[] grad_shortcut_inputs, Tensor[] grad_shortcut_weights)");
  // instance_norm_add_lrelu with its output written over z (CPU only; the statistics are returned).
  m.def(
      "instance_norm_add_lrelu_inplace(Tensor(a!) z, Tensor? residual, Tensor[] shortcut_inputs,"
      " Tensor[] shortcut_weights, float negative_slope, float eps)"
      " -> (Tensor mean, Tensor rstd, Tensor shortcut_mean, Tensor shortcut_rstd)");
}
