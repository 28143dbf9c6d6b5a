// Torch binding of the CUDA low-bit GEMM kernels: operators torch.ops.qframe_cuda.*, registered
// when the module qframe._C_cuda is imported. Checks device, dtype, shape and contiguity with
// one-line messages, then calls the launchers (launchers.h) on the current stream.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>

#include "launchers.h"

namespace qcu = qframe::cuda;

namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kInt: return "int32";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << dtype_name(t.scalar_type()) << " " << t.sizes() << " on " << t.device();
  return s.str();
}

void check(const char* op, const at::Tensor& t, const char* name, at::ScalarType dt, int64_t dim, const char* shape,
           const at::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined; pass a tensor");
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " (where a is), got ", describe(t));
  TORCH_CHECK_VALUE(t.scalar_type() == dt && t.dim() == dim, op, ": ", name, " must be ", dtype_name(dt), " ", shape,
                    ", got ", describe(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(), "; call .contiguous()");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_scales(const char* op, const at::Tensor& w_scale, int64_t N, int64_t K, int64_t group_size,
                  const at::Device& device) {
  if (group_size <= 0) {
    TORCH_CHECK_VALUE(w_scale.numel() == N && (w_scale.dim() == 1 || (w_scale.dim() == 2 && w_scale.size(1) == 1)), op,
                      ": per-channel w_scale (group_size <= 0) must be float32 [N] = [", N, "], got ", describe(w_scale));
    check(op, w_scale, "w_scale", at::kFloat, w_scale.dim(), "[N]", device);
    return;
  }
  const int64_t groups = ceil_div(K, group_size);
  check(op, w_scale, "w_scale", at::kFloat, 2, "[N, ceil(K / group_size)]", device);
  TORCH_CHECK_VALUE(w_scale.size(0) == N && w_scale.size(1) == groups, op, ": w_scale for group_size ", group_size,
                    " must be float32 [N, ceil(K / group_size)] = [", N, ", ", groups, "], got ", describe(w_scale));
}

const float* bias_ptr(const char* op, const std::optional<at::Tensor>& bias, int64_t N, const at::Device& device) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check(op, *bias, "bias", at::kFloat, 1, "[N]", device);
  TORCH_CHECK_VALUE(bias->size(0) == N, op, ": bias must be float32 [N] = [", N, "], got ", describe(*bias));
  return bias->data_ptr<float>();
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor int8_impl(const char* op, const at::Tensor& a, const at::Tensor* a_scale, const at::Tensor& w,
                     const at::Tensor* w_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(a.defined() && a.is_cuda(), op, ": a must be a CUDA tensor, got ",
                    a.defined() ? describe(a) : std::string("undefined"));
  const at::Device dev = a.device();
  check(op, a, "a", at::kChar, 2, "[M, K]", dev);
  check(op, w, "w", at::kChar, 2, "[N, K]", dev);
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == K, op, ": w must be int8 [N, K] with K = ", K, ", got ", describe(w));
  const float* b = nullptr;
  if (a_scale) {
    check(op, *a_scale, "a_scale", at::kFloat, 1, "[M]", dev);
    TORCH_CHECK_VALUE(a_scale->size(0) == M, op, ": a_scale must be float32 [M] = [", M, "], got ", describe(*a_scale));
    check(op, *w_scale, "w_scale", at::kFloat, 1, "[N]", dev);
    TORCH_CHECK_VALUE(w_scale->size(0) == N, op, ": w_scale must be float32 [N] = [", N, "], got ", describe(*w_scale));
    b = bias_ptr(op, bias, N, dev);
  }
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({M, N}, a.options().dtype(a_scale ? at::kFloat : at::kInt));
  check_launch(op, qcu::int8_mm(a.data_ptr<int8_t>(), w.data_ptr<int8_t>(), a_scale ? nullptr : out.data_ptr<int32_t>(),
                                a_scale ? out.data_ptr<float>() : nullptr, a_scale ? a_scale->data_ptr<float>() : nullptr,
                                w_scale ? w_scale->data_ptr<float>() : nullptr, b, M, N, K,
                                c10::cuda::getCurrentCUDAStream(dev.index()).stream()));
  return out;
}

at::Tensor int8_mm_i32(const at::Tensor& a, const at::Tensor& w) { return int8_impl("int8_mm_i32", a, nullptr, w, nullptr, std::nullopt); }

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w, const at::Tensor& w_scale,
                   const std::optional<at::Tensor>& bias) {
  return int8_impl("int8_mm", a, &a_scale, w, &w_scale, bias);
}

at::Tensor w4a8_mm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w_packed, const at::Tensor& w_scale,
                   int64_t group_size, const std::optional<at::Tensor>& bias) {
  const char* op = "w4a8_mm";
  TORCH_CHECK_VALUE(a.defined() && a.is_cuda(), op, ": a must be a CUDA tensor, got ",
                    a.defined() ? describe(a) : std::string("undefined"));
  const at::Device dev = a.device();
  check(op, a, "a", at::kChar, 2, "[M, K]", dev);
  const int64_t M = a.size(0), K = a.size(1);
  check(op, a_scale, "a_scale", at::kFloat, 1, "[M]", dev);
  TORCH_CHECK_VALUE(a_scale.size(0) == M, op, ": a_scale must be float32 [M] = [", M, "], got ", describe(a_scale));
  check(op, w_packed, "w_packed", at::kByte, 2, "[N, ceil(K / 2)]", dev);
  const int64_t N = w_packed.size(0);
  TORCH_CHECK_VALUE(w_packed.size(1) == ceil_div(K, 2), op, ": w_packed must be uint8 [N, ceil(K / 2)] = [N, ",
                    ceil_div(K, 2), "] for K = ", K, ", got ", describe(w_packed));
  check_scales(op, w_scale, N, K, group_size, dev);
  const float* b = bias_ptr(op, bias, N, dev);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kFloat));
  check_launch(op, qcu::w4a8_mm(a.data_ptr<int8_t>(), a_scale.data_ptr<float>(), w_packed.data_ptr<uint8_t>(),
                                w_scale.data_ptr<float>(), group_size, b, out.data_ptr<float>(), M, N, K,
                                c10::cuda::getCurrentCUDAStream(dev.index()).stream()));
  return out;
}

at::Tensor w4a16_mm(const at::Tensor& a, const at::Tensor& w_packed, const at::Tensor& w_scale, int64_t group_size,
                    const std::optional<at::Tensor>& bias) {
  const char* op = "w4a16_mm";
  TORCH_CHECK_VALUE(a.defined() && a.is_cuda(), op, ": a must be a CUDA tensor, got ",
                    a.defined() ? describe(a) : std::string("undefined"));
  const at::Device dev = a.device();
  const at::ScalarType dt = a.scalar_type();
  TORCH_CHECK_VALUE((dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) && a.dim() == 2, op,
                    ": a must be bfloat16, float16 or float32 [M, K], got ", describe(a));
  check(op, a, "a", dt, 2, "[M, K]", dev);
  const int64_t M = a.size(0), K = a.size(1);
  check(op, w_packed, "w_packed", at::kByte, 2, "[N, ceil(K / 2)]", dev);
  const int64_t N = w_packed.size(0);
  TORCH_CHECK_VALUE(w_packed.size(1) == ceil_div(K, 2), op, ": w_packed must be uint8 [N, ceil(K / 2)] = [N, ",
                    ceil_div(K, 2), "] for K = ", K, ", got ", describe(w_packed));
  check_scales(op, w_scale, N, K, group_size, dev);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();  // a.dtype or float32
  const float* b = bias_f.defined() ? bias_ptr(op, bias_f, N, dev) : nullptr;
  const qcu::DType kind = dt == at::kFloat ? qcu::DType::kFloat32 : dt == at::kHalf ? qcu::DType::kFloat16 : qcu::DType::kBFloat16;
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({M, N}, a.options());
  check_launch(op, qcu::w4a16_mm(a.data_ptr(), kind, w_packed.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), group_size,
                                 b, out.data_ptr(), M, N, K, c10::cuda::getCurrentCUDAStream(dev.index()).stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY(qframe_cuda, m) {
  m.def("int8_mm_i32(Tensor a, Tensor w) -> Tensor");
  m.def("int8_mm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor");
  m.def("w4a8_mm(Tensor a, Tensor a_scale, Tensor w_packed, Tensor w_scale, int group_size, Tensor? bias=None) -> Tensor");
  m.def("w4a16_mm(Tensor a, Tensor w_packed, Tensor w_scale, int group_size, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(qframe_cuda, CUDA, m) {
  m.impl("int8_mm_i32", &int8_mm_i32);
  m.impl("int8_mm", &int8_mm);
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("w4a16_mm", &w4a16_mm);
}

// Python module shell: importing qframe._C_cuda loads the library and registers the operators.
#define QF_CAT2(a, b) a##b
#define QF_CAT(a, b) QF_CAT2(a, b)
#define QF_STR2(a) #a
#define QF_STR(a) QF_STR2(a)

static struct PyModuleDef qframe_cuda_module = {
    PyModuleDef_HEAD_INIT, QF_STR(TORCH_EXTENSION_NAME),
    "qframe CUDA kernels; the operators live in torch.ops.qframe_cuda", -1, nullptr};

PyMODINIT_FUNC QF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&qframe_cuda_module); }
