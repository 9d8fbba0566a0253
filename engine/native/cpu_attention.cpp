// Attention for float32 training on the CPU as two MLX primitives: the forward pass and its gradient.
//
// MLX's CPU backend runs a training step's attention as many small products and element-wise passes, each
// on one core (its element-wise kernels have no intra-op threads). Here one primitive does a whole layer:
// tasks of one (batch, key head) run on every core, the products are BLAS calls (the preloaded MKL, one
// thread each) over blocks of 64 queries, and the softmax is a vectorized loop between them. As in flash
// attention the forward pass keeps each row's log-sum-exp, and the backward pass recomputes the
// probabilities from it rather than keeping them. A causal block skips the keys its rows cannot see.
// Built at run time by engine/native/build.py (-O3 -march=native -ffast-math).

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "primitive.h"

namespace nb = nanobind;
using namespace nb::literals;

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace {

constexpr int kBlock = 64;  // query rows a block: one block's scores (64 x keys) stay in L2

struct Dims {
  int batch, heads, kv_heads, length, keys, dim;
  int group() const { return heads / kv_heads; }
};

void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
          float beta, float* c, int ldc) {
  cblas_sgemm(101, ta ? 112 : 111, tb ? 112 : 111, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// MKL's own threads would contend for the cores the tasks already use, so each worker asks MKL for its share
// (a thread-local setting, restored after). Another BLAS lacks the symbol and runs as configured.
using SetLocalThreads = int (*)(int);
SetLocalThreads mkl_set_local_threads() {
  static auto fn = reinterpret_cast<SetLocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
}

// Runs fn(task, scratch) for every task on up to `threads` threads of OpenMP's pool: the pool MKL's GNU
// threading layer already keeps spinning after each product, so waking it costs nothing, where threads of
// our own would contend with MKL's for the cores.
template <typename F>
void run_tasks(int tasks, int threads, size_t scratch_floats, F fn) {
  const int team = std::max(1, std::min(threads, tasks));  // fewer tasks than threads: MKL gets the rest
#pragma omp parallel num_threads(team)
  {
    auto set_local = mkl_set_local_threads();
    int previous = set_local ? set_local(std::max(1, threads / team)) : 0;
    std::vector<float> scratch(scratch_floats);
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < tasks; ++t) fn(t, scratch.data());
    if (set_local) set_local(previous);
  }
}

// How many keys row r of a block sees: causal rows see keys up to r + (keys - length).
inline int visible(const Dims& d, bool causal, int row) {
  return causal ? std::min(d.keys, row + d.keys - d.length + 1) : d.keys;
}

// Queries, outputs and their gradients are (B, L, H, D), keys and values (B, S, KV, D): the layout the model's
// projections make, so that neither the inputs nor the output need a transposing copy. Head h's row r is at
// ((b L + r) H + h) D, rows `heads x D` apart, which BLAS takes as the leading dimension.
struct Heads {
  const Dims& d;
  size_t query(int b, int h) const { return (size_t(b) * d.length * d.heads + h) * d.dim; }
  size_t key(int b, int g) const { return (size_t(b) * d.keys * d.kv_heads + g) * d.dim; }
  int qld() const { return d.heads * d.dim; }
  int kld() const { return d.kv_heads * d.dim; }
};

void forward(const Dims& d, float scale, bool causal, int threads, const float* q, const float* k, const float* v,
             float* out, float* lse) {
  const int D = d.dim, L = d.length, S = d.keys;
  const Heads at{d};
  const int qld = at.qld(), kld = at.kld();
  run_tasks(d.batch * d.kv_heads, threads, size_t(kBlock) * S, [&](int task, float* p) {
    int b = task / d.kv_heads, g = task % d.kv_heads;
    const float* kt = k + at.key(b, g);
    const float* vt = v + at.key(b, g);
    for (int h = g * d.group(); h < (g + 1) * d.group(); ++h) {
      size_t row0 = size_t(b * d.heads + h) * L;  // the log-sum-exp is (B, H, L)
      const float* qh = q + at.query(b, h);
      float* oh = out + at.query(b, h);
      for (int r0 = 0; r0 < L; r0 += kBlock) {
        int rows = std::min(kBlock, L - r0), cols = visible(d, causal, r0 + rows - 1);
        gemm(false, true, rows, cols, D, scale, qh + size_t(r0) * qld, qld, kt, kld, 0.f, p, cols);
        for (int i = 0; i < rows; ++i) {
          float* s = p + size_t(i) * cols;
          int n = visible(d, causal, r0 + i);
          float m = s[0];
          for (int j = 1; j < n; ++j) m = std::max(m, s[j]);
          float sum = 0.f;
          for (int j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
          float inv = 1.f / sum;
          for (int j = 0; j < n; ++j) s[j] *= inv;
          std::fill(s + n, s + cols, 0.f);
          lse[row0 + r0 + i] = m + std::log(sum);
        }
        gemm(false, false, rows, D, cols, 1.f, p, cols, vt, kld, 0.f, oh + size_t(r0) * qld, qld);
      }
    }
  });
}

void backward(const Dims& d, float scale, bool causal, int threads, const float* q, const float* k,
              const float* v, const float* out, const float* lse, const float* dout, float* dq, float* dk,
              float* dv) {
  const int D = d.dim, L = d.length, S = d.keys;
  const Heads at{d};
  const int qld = at.qld(), kld = at.kld();
  run_tasks(d.batch * d.kv_heads, threads, 2 * size_t(kBlock) * S, [&](int task, float* p) {
    float* ds = p + size_t(kBlock) * S;
    int b = task / d.kv_heads, g = task % d.kv_heads;
    const size_t kv0 = at.key(b, g);
    for (int j = 0; j < S; ++j) {  // the task owns its key head: sums without locks
      std::fill(dk + kv0 + size_t(j) * kld, dk + kv0 + size_t(j) * kld + D, 0.f);
      std::fill(dv + kv0 + size_t(j) * kld, dv + kv0 + size_t(j) * kld + D, 0.f);
    }
    for (int h = g * d.group(); h < (g + 1) * d.group(); ++h) {
      size_t row0 = size_t(b * d.heads + h) * L;
      const size_t q0 = at.query(b, h);
      for (int r0 = 0; r0 < L; r0 += kBlock) {
        int rows = std::min(kBlock, L - r0), cols = visible(d, causal, r0 + rows - 1);
        const float* qb = q + q0 + size_t(r0) * qld;
        const float* gb = dout + q0 + size_t(r0) * qld;
        gemm(false, true, rows, cols, D, scale, qb, qld, k + kv0, kld, 0.f, p, cols);
        for (int i = 0; i < rows; ++i) {  // the probabilities again, from the forward pass's log-sum-exp
          float* s = p + size_t(i) * cols;
          int n = visible(d, causal, r0 + i);
          float m = lse[row0 + r0 + i];
          for (int j = 0; j < n; ++j) s[j] = std::exp(s[j] - m);
          std::fill(s + n, s + cols, 0.f);
        }
        gemm(true, false, cols, D, rows, 1.f, p, cols, gb, qld, 1.f, dv + kv0, kld);  // dV += P^T dO
        gemm(false, true, rows, cols, D, 1.f, gb, qld, v + kv0, kld, 0.f, ds, cols);  // dP = dO V^T
        for (int i = 0; i < rows; ++i) {  // dS = P (dP - rowsum(dO * O)), zero where P is
          const float* o = out + q0 + size_t(r0 + i) * qld;
          const float* gr = gb + size_t(i) * qld;
          float dot = 0.f;
          for (int j = 0; j < D; ++j) dot += gr[j] * o[j];
          float* s = ds + size_t(i) * cols;
          const float* pr = p + size_t(i) * cols;
          for (int j = 0; j < cols; ++j) s[j] = pr[j] * (s[j] - dot);
        }
        gemm(false, false, rows, D, cols, scale, ds, cols, k + kv0, kld, 0.f, dq + q0 + size_t(r0) * qld, qld);
        gemm(true, false, cols, D, rows, scale, ds, cols, qb, qld, 1.f, dk + kv0, kld);  // dK += scale dS^T Q
      }
    }
  });
}

Dims dims_of(const mx::array& q, const mx::array& k) {  // (B, L, H, D) queries, (B, S, KV, D) keys
  return {q.shape(0), q.shape(2), k.shape(2), q.shape(1), k.shape(1), q.shape(3)};
}

struct AttentionSettings {
  float scale;
  bool causal;
  int threads;
  bool operator==(const AttentionSettings&) const = default;
};

class AttentionGrad : public lora_tui::CpuPrimitive<AttentionSettings> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, s = settings_] {
      return [d = dims_of(in[0], in[1]), s, q = in[0].data<float>(), k = in[1].data<float>(),
              v = in[2].data<float>(), o = in[3].data<float>(), lse = in[4].data<float>(), g = in[5].data<float>(),
              dq = out[0].data<float>(), dk = out[1].data<float>(), dv = out[2].data<float>()]() {
        backward(d, s.scale, s.causal, s.threads, q, k, v, o, lse, g, dq, dk, dv);
      };
    });
  }
  const char* name() const override { return "LoraTuiCpuAttentionGrad"; }
};

class Attention : public lora_tui::CpuPrimitive<AttentionSettings> {
 public:
  using CpuPrimitive::CpuPrimitive;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    lora_tui::run_on_cpu(stream(), in, out, [&, s = settings_] {
      return [d = dims_of(in[0], in[1]), s, q = in[0].data<float>(), k = in[1].data<float>(),
              v = in[2].data<float>(), o = out[0].data<float>(), lse = out[1].data<float>()]() {
        forward(d, s.scale, s.causal, s.threads, q, k, v, o, lse);
      };
    });
  }
  // The log-sum-exp output only carries the forward pass's softmax to the backward pass: its cotangent,
  // zero wherever a caller does not use it, is not propagated.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape(), primals[2].shape()}, {mx::float32, mx::float32, mx::float32},
        std::make_shared<AttentionGrad>(stream(), settings_),
        {primals[0], primals[1], primals[2], outputs[0], outputs[1], mx::contiguous(cotangents[0], false, stream())});
    return lora_tui::pick(grads, argnums);
  }
  const char* name() const override { return "LoraTuiCpuAttention"; }
};

// softmax(q k^T * scale [+ causal mask]) v for float32 (B, L, H, D) queries and (B, S, KV, D) keys and values,
// as (B, L, H, D); H a multiple of KV and S >= L (query i sees keys up to i + S - L when causal).
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    int threads) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || q.shape(0) != k.shape(0) ||
      q.shape(3) != k.shape(3) || q.shape(2) % k.shape(2) != 0 || k.shape(1) < q.shape(1)) {
    throw std::invalid_argument("cpu attention: expected (B, L, H, D) queries and (B, S, KV, D) keys/values");
  }
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32) {
    throw std::invalid_argument("cpu attention: float32 only");
  }
  auto s = mx::to_stream(mx::Device::cpu);
  mx::Shape lse_shape{q.shape(0), q.shape(2), q.shape(1)};
  return mx::array::make_arrays({q.shape(), lse_shape}, {mx::float32, mx::float32},
                                std::make_shared<Attention>(s, AttentionSettings{scale, causal, std::max(1, threads)}),
                                {mx::contiguous(q, false, s), mx::contiguous(k, false, s),
                                 mx::contiguous(v, false, s)})[0];
}

}  // namespace

NB_MODULE(_lora_tui_cpu_attention, m) {
  m.def("size_of", [](const mx::array& a) { return a.size(); });  // build.py: do arrays pass?
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, "threads"_a);
}
