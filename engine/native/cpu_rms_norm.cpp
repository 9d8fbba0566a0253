// RMSNorm, x * rsqrt(mean(x^2) + eps) * w over the last axis, and its gradient for float32 training on the CPU.
//
// On the CPU, mx.fast.rms_norm runs as MLX's ops: a square, a mean, a multiply and, under autograd, a
// backward pass of five more, each a pass over the array on one core (2.5 ms a norm, fwd + bwd, at the
// embedded model's 1,280 x 576; a step has 61). Here each direction is one pass, rows split over OpenMP's
// pool. The gradient recomputes each row's scale rather than keeping it. Built by engine/native/build.py.

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include <omp.h>
#include <nanobind/nanobind.h>

#include "primitive.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

struct Settings {
  float eps;
  int threads;
  bool operator==(const Settings&) const = default;
};

float inv_rms(const float* x, long d, float eps) {
  float sum = 0.f;
  for (long j = 0; j < d; ++j) sum += x[j] * x[j];
  return 1.f / std::sqrt(sum / float(d) + eps);
}

void forward(long rows, long d, const Settings& s, const float* x, const float* w, float* y) {
#pragma omp parallel for num_threads(s.threads) schedule(static)
  for (long r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float k = inv_rms(xr, d, s.eps);
    for (long j = 0; j < d; ++j) yr[j] = xr[j] * k * w[j];
  }
}

// dx = k * (g w - n * mean(g w n)), n = x k; dw (when asked for) = the sum over rows of g n, summed per thread
// into its own row of `partial`, then across threads: no atomics, the same result for a given thread count.
void backward(long rows, long d, const Settings& s, const float* x, const float* w, const float* g, float* dx,
              float* dw) {
  std::vector<float> partial(dw ? size_t(s.threads) * d : 0, 0.f);
#pragma omp parallel num_threads(s.threads)
  {
    float* mine = dw ? partial.data() + long(omp_get_thread_num()) * d : nullptr;
#pragma omp for schedule(static)
    for (long r = 0; r < rows; ++r) {
      const float *xr = x + r * d, *gr = g + r * d;
      float* dxr = dx + r * d;
      const float k = inv_rms(xr, d, s.eps);
      float dot = 0.f;
      for (long j = 0; j < d; ++j) dot += gr[j] * w[j] * xr[j];
      const float c = dot * k * k / float(d);  // mean(g w n) / k
      for (long j = 0; j < d; ++j) dxr[j] = k * (gr[j] * w[j] - xr[j] * c);
      if (mine)
        for (long j = 0; j < d; ++j) mine[j] += gr[j] * xr[j] * k;
    }
  }
  if (dw) {
    std::fill(dw, dw + d, 0.f);
    for (int t = 0; t < s.threads; ++t)
      for (long j = 0; j < d; ++j) dw[j] += partial[size_t(t) * d + j];
  }
}

class RMSNormGrad : public lora_tui::CpuPrimitive<Settings> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, s = settings_] {
      const long d = in[0].shape(-1);
      return [rows = long(in[0].size()) / d, d, s, x = in[0].data<float>(), w = in[1].data<float>(),
              g = in[2].data<float>(), dx = out[0].data<float>(),
              dw = out.size() > 1 ? out[1].data<float>() : nullptr]() { backward(rows, d, s, x, w, g, dx, dw); };
    });
  }
  const char* name() const override { return "LoraTuiCpuRMSNormGrad"; }
};

class RMSNorm : public lora_tui::CpuPrimitive<Settings> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, s = settings_] {
      const long d = in[0].shape(-1);
      return [rows = long(in[0].size()) / d, d, s, x = in[0].data<float>(), w = in[1].data<float>(),
              y = out[0].data<float>()]() { forward(rows, d, s, x, w, y); };
    });
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const bool weight_grad = std::find(argnums.begin(), argnums.end(), 1) != argnums.end();
    std::vector<mx::Shape> shapes{primals[0].shape()};
    if (weight_grad) shapes.push_back(primals[1].shape());
    auto grads = mx::array::make_arrays(
        shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32), std::make_shared<RMSNormGrad>(stream(), settings_),
        {primals[0], primals[1], mx::contiguous(cotangents[0], false, stream())});
    if (!weight_grad) grads.push_back(mx::zeros_like(primals[1], stream()));  // never read: not in argnums
    return lora_tui::pick(grads, argnums);
  }
  const char* name() const override { return "LoraTuiCpuRMSNorm"; }
};

// RMSNorm over the last axis of float32 x with a float32 weight as long as that axis.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, int threads) {
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32 || x.ndim() < 1 || weight.ndim() != 1 ||
      weight.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("cpu rms_norm: x and weight must be float32, weight as long as x's last axis");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(s, Settings{eps, std::max(1, threads)}),
                   {mx::contiguous(x, false, s), mx::contiguous(weight, false, s)});
}

}  // namespace

NB_MODULE(_lora_tui_cpu_rms_norm, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, "threads"_a);
}
