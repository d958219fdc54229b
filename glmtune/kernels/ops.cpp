// torch.ops.glmtune: the decode kernels as torch custom ops. Checks the tensors (a wrong call raises, never
// reads out of bounds), allocates the output and runs the kernel over output rows on torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"

namespace glmtune {
namespace {

constexpr int64_t kGrain = 64;  // output rows per task at least

DType float_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "glmtune: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu_contiguous(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "glmtune: ", what, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, "glmtune: ", what, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), "glmtune: ", what, " must be contiguous");
}

const void* bias_pointer(const std::optional<at::Tensor>& bias, int64_t n, DType& dtype) {
  dtype = DType::F32;
  if (!bias.has_value()) return nullptr;
  check_cpu_contiguous(*bias, "bias", 1);
  TORCH_CHECK(bias->size(0) == n, "glmtune: bias has ", bias->size(0), " values for ", n, " outputs");
  dtype = float_dtype(*bias, "bias");
  return bias->data_ptr();
}

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias, int bits) {
  check_cpu_contiguous(x, "x", 2);
  check_cpu_contiguous(weight, "weight", 2);
  check_cpu_contiguous(scale, "weight_scale", 1);
  const DType dtype = float_dtype(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kChar, "glmtune: the quantized weight must be int8");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) * (bits == 4 ? 2 : 1) == k, "glmtune: int", bits, " weight of ", weight.size(1),
              " stored columns does not match ", k, " inputs");
  TORCH_CHECK(scale.size(0) == n, "glmtune: weight_scale has ", scale.size(0), " values for ", n, " rows");
  const int64_t features = cpu_features();
  const bool avx512 = features & kAvx512Vnni;
  TORCH_CHECK(avx512 || (features & kAvx2), "glmtune: this CPU has neither AVX512-VNNI nor AVX2+FMA");
  QuantArgs args{};
  args.bias = bias_pointer(bias, n, args.bias_dtype);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return out;
  Activations act;
  quantize_activations(x.data_ptr(), dtype, rows, k, k, bits, act);
  args.act = &act;
  args.weight = weight.data_ptr<int8_t>();
  args.scale = scale.data_ptr();
  args.scale_dtype = float_dtype(scale, "weight_scale");
  args.out = out.data_ptr();
  args.out_dtype = dtype;
  args.n = n;
  auto kernel = bits == 4 ? (avx512 ? int4_rows_avx512 : int4_rows_avx2)
                          : (avx512 ? int8_rows_avx512 : int8_rows_avx2);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  return quantized_linear(x, weight, scale, bias, 4);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  return quantized_linear(x, weight, scale, bias, 8);
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_cpu_contiguous(x, "x", 2);
  check_cpu_contiguous(weight, "weight", 2);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "glmtune: bf16_linear takes bfloat16 x and weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "glmtune: weight of ", weight.size(1), " columns does not match ",
              x.size(1), " inputs");
  TORCH_CHECK(cpu_features() & kAvx512Bf16, "glmtune: this CPU has no AVX512-BF16");
  Bf16Args args{};
  args.rows = x.size(0);
  args.k = x.size(1);
  args.n = weight.size(0);
  args.bias = bias_pointer(bias, args.n, args.bias_dtype);
  at::Tensor out = at::empty({args.rows, args.n}, x.options());
  if (args.rows == 0 || args.n == 0) return out;
  args.x = reinterpret_cast<const uint16_t*>(x.data_ptr());
  args.weight = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  args.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, args.n, kGrain, [&](int64_t begin, int64_t end) { bf16_rows_avx512(args, begin, end); });
  return out;
}

}  // namespace
}  // namespace glmtune

TORCH_LIBRARY(glmtune, m) {
  m.def("cpu_features() -> int", [] { return glmtune::cpu_features(); });
  m.def("limit_features(int mask) -> int", [](int64_t mask) { return glmtune::limit_features(mask); });
  m.def("int4_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmtune, CPU, m) {
  m.impl("int4_linear", glmtune::int4_linear);
  m.impl("int8_linear", glmtune::int8_linear);
  m.impl("bf16_linear", glmtune::bf16_linear);
}
