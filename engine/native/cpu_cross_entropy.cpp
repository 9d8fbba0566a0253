// Cross-entropy over float32 logits, logsumexp(row) - row[target], and its gradient, for training on the CPU
// as two MLX primitives.
//
// The head's logits are the step's largest element-wise arrays (rows x vocabulary). MLX's CPU kernels pass
// over them several times on one core (max, exp and sum, then the softmax's gradient); here the forward pass
// reads them once per row on every core and keeps each row's log-sum-exp, and the gradient reads them once
// more and writes (softmax - one-hot) * cotangent. Built at run time by engine/native/build.py.

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include <nanobind/nanobind.h>

#include "primitive.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

void forward(long rows, long vocab, int threads, const float* logits, const int* targets, float* loss,
             float* lse) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; ++r) {
    const float* x = logits + r * vocab;
    float m = x[0];
    for (long v = 1; v < vocab; ++v) m = std::max(m, x[v]);
    float sum = 0.f;
    for (long v = 0; v < vocab; ++v) sum += std::exp(x[v] - m);
    lse[r] = m + std::log(sum);
    long t = targets[r];
    loss[r] = (t >= 0 && t < vocab) ? lse[r] - x[t] : std::numeric_limits<float>::quiet_NaN();
  }
}

void backward(long rows, long vocab, int threads, const float* logits, const int* targets, const float* lse,
              const float* cotangent, float* grad) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; ++r) {
    const float* x = logits + r * vocab;
    float* g = grad + r * vocab;
    float c = cotangent[r], m = lse[r];
    for (long v = 0; v < vocab; ++v) g[v] = std::exp(x[v] - m) * c;
    long t = targets[r];
    if (t >= 0 && t < vocab) g[t] -= c;
  }
}

class CrossEntropyGrad : public lora_tui::CpuPrimitive<lora_tui::Threads> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, t = settings_.threads] {
      return [rows = long(in[0].shape(0)), vocab = long(in[0].shape(1)), t, x = in[0].data<float>(),
              ids = in[1].data<int>(), lse = in[2].data<float>(), c = in[3].data<float>(),
              g = out[0].data<float>()]() { backward(rows, vocab, t, x, ids, lse, c, g); };
    });
  }
  const char* name() const override { return "LoraTuiCpuCrossEntropyGrad"; }
};

class CrossEntropy : public lora_tui::CpuPrimitive<lora_tui::Threads> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, t = settings_.threads] {
      return [rows = long(in[0].shape(0)), vocab = long(in[0].shape(1)), t, x = in[0].data<float>(),
              ids = in[1].data<int>(), loss = out[0].data<float>(), lse = out[1].data<float>()]() {
        forward(rows, vocab, t, x, ids, loss, lse);
      };
    });
  }
  // The targets get no gradient (integers); the log-sum-exp output only carries the forward pass to this one.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    auto logits = mx::array(primals[0].shape(), mx::float32, std::make_shared<CrossEntropyGrad>(stream(), settings_),
                            {primals[0], primals[1], outputs[1], mx::contiguous(cotangents[0], false, stream())});
    return lora_tui::pick({logits, mx::zeros_like(primals[1], stream())}, argnums);
  }
  const char* name() const override { return "LoraTuiCpuCrossEntropy"; }
};

// Each row's cross-entropy: (rows, vocab) float32 logits, (rows,) integer targets.
mx::array cross_entropy(const mx::array& logits, const mx::array& targets, int threads) {
  if (logits.ndim() != 2 || logits.dtype() != mx::float32 || targets.ndim() != 1 ||
      targets.shape(0) != logits.shape(0) || !mx::issubdtype(targets.dtype(), mx::integer)) {
    throw std::invalid_argument("cpu cross_entropy: (rows, vocab) float32 logits and (rows,) integer targets");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  mx::Shape rows{logits.shape(0)};
  auto ids = mx::contiguous(mx::astype(targets, mx::int32, s), false, s);
  return mx::array::make_arrays({rows, rows}, {mx::float32, mx::float32},
                                std::make_shared<CrossEntropy>(s, lora_tui::Threads{std::max(1, threads)}),
                                {mx::contiguous(logits, false, s), ids})[0];
}

}  // namespace

NB_MODULE(_lora_tui_cpu_cross_entropy, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("cross_entropy", &cross_entropy, "logits"_a, "targets"_a, "threads"_a);
}
