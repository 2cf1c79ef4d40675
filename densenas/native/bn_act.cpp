// Training-mode BatchNorm2d (+ ReLU6) over a channels_last float32 CPU tensor, forward and backward,
// each in two passes over memory (one reduction, one elementwise). densenas/native/__init__.py builds
// it and densenas/ops.py decides when to use it; see there for why it exists.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t kBlock = 32;  // rows summed in float before they are added into the double totals

int64_t grain_rows(int64_t C) { return std::max<int64_t>(kBlock, (65536 / std::max<int64_t>(C, 1)) / kBlock * kBlock); }

// Two per-channel sums over rows [0, M) into double totals s1, s2: each block of kBlock rows is first summed
// in float (vectorised over channels), then added in. add_row(m, a, b) adds row m's terms into a and b.
template <typename AddRow>
void block_sums(int64_t M, int64_t C, double* __restrict__ s1, double* __restrict__ s2, const AddRow& add_row) {
  std::vector<float> fa(C), fb(C);
  float* __restrict__ a = fa.data();
  float* __restrict__ b = fb.data();
  for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
    const int64_t m1 = std::min(M, m0 + kBlock);
    std::fill(a, a + C, 0.f);
    std::fill(b, b + C, 0.f);
    for (int64_t m = m0; m < m1; ++m) add_row(m, a, b);
    for (int64_t c = 0; c < C; ++c) { s1[c] += a[c]; s2[c] += b[c]; }
  }
}

// Forward sums over x[M, C] minus the shift k: s = sum(x - k), q = sum((x - k)^2).
void sums_fwd(const float* __restrict__ xp, const float* __restrict__ kp, int64_t M, int64_t C,
              double* __restrict__ s, double* __restrict__ q) {
  block_sums(M, C, s, q, [&](int64_t m, float* __restrict__ a, float* __restrict__ b) {
    const float* __restrict__ r = xp + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) { const float d = r[c] - kp[c]; a[c] += d; b[c] += d * d; }
  });
}

// Backward sums: sg = sum(gm), sx = sum(gm * (x - mean)), gm = g masked by 0 < x * a + b < 6 when relu6
// (ap / bp given): the forward's pre-activation, recomputed bit for bit (the same fmaf), so the output
// need not be read.
void sums_bwd(const float* __restrict__ gp, const float* __restrict__ xp, const float* __restrict__ ap,
              const float* __restrict__ bp, const float* __restrict__ mp, int64_t M, int64_t C,
              double* __restrict__ sg, double* __restrict__ sx) {
  block_sums(M, C, sg, sx, [&](int64_t m, float* __restrict__ a, float* __restrict__ b) {
    const float* __restrict__ gr = gp + m * C;
    const float* __restrict__ xr = xp + m * C;
    if (ap) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float v = std::fmaf(xr[c], ap[c], bp[c]);
        const float gm = (v > 0.f && v < 6.f) ? gr[c] : 0.f;
        a[c] += gm; b[c] += gm * (xr[c] - mp[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) { a[c] += gr[c]; b[c] += gr[c] * (xr[c] - mp[c]); }
    }
  });
}
}  // namespace

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, " must be a 4-d float32 CPU tensor in channels_last layout");
}

void check_channels(const std::optional<at::Tensor>& t, int64_t C, const char* what) {
  if (t) TORCH_CHECK(t->dim() == 1 && t->numel() == C && t->scalar_type() == at::kFloat && t->is_contiguous(),
                     what, " must be a contiguous float32 vector of ", C, " channels");
}

// Returns (out, mean, invstd, affine) with affine = [a; b] (2 x C: out = x * a + b before the ReLU6,
// for the backward's mask); updates running_mean / running_var in place when given (unbiased variance).
std::vector<at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& weight_o,
                                const std::optional<at::Tensor>& bias_o, const std::optional<at::Tensor>& rm_o,
                                const std::optional<at::Tensor>& rv_o, double momentum, double eps, bool relu6) {
  check_input(x, "input");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t M = N * H * W;
  TORCH_CHECK(M > 1, "batch norm needs more than one value per channel, got input of size ", x.sizes());
  check_channels(weight_o, C, "weight");
  check_channels(bias_o, C, "bias");
  check_channels(rm_o, C, "running_mean");
  check_channels(rv_o, C, "running_var");
  auto out = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  std::vector<double> part(2 * (size_t)nt * C, 0.0);
  std::vector<float> shift(xp, xp + C);  // first row: a shift against cancellation in the sum of squares
  const float* kp = shift.data();
  at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
    double* s = part.data() + (size_t)2 * at::get_thread_num() * C;
    sums_fwd(xp + b * C, kp, e - b, C, s, s + C);
  });
  auto mean = at::empty({C}, x.options());
  auto invstd = at::empty({C}, x.options());
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();
  auto affine = at::empty({2, C}, x.options());
  float* a = affine.data_ptr<float>();
  float* bb = a + C;
  const float* wp = weight_o ? weight_o->data_ptr<float>() : nullptr;
  const float* bp = bias_o ? bias_o->data_ptr<float>() : nullptr;
  float* rmp = rm_o ? rm_o->data_ptr<float>() : nullptr;
  float* rvp = rv_o ? rv_o->data_ptr<float>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, q = 0;
    for (int t = 0; t < nt; ++t) { s += part[(size_t)2 * t * C + c]; q += part[(size_t)2 * t * C + C + c]; }
    const double dm = s / M;
    const double var = std::max(0.0, q / M - dm * dm);
    const double mu = kp[c] + dm;
    const double is = 1.0 / std::sqrt(var + eps);
    mp[c] = (float)mu;
    ip[c] = (float)is;
    const double w = wp ? wp[c] : 1.0;
    a[c] = (float)(is * w);
    bb[c] = (float)((bp ? bp[c] : 0.0) - mu * is * w);
    if (rmp) rmp[c] = (float)((1 - momentum) * rmp[c] + momentum * mu);
    if (rvp) rvp[c] = (float)((1 - momentum) * rvp[c] + momentum * var * M / std::max<int64_t>(M - 1, 1));
  }
  const float* __restrict__ ap = a;
  const float* __restrict__ cp = bb;
  at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* __restrict__ r = xp + m * C;
      float* __restrict__ o = op + m * C;
      if (relu6) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = std::min(std::max(std::fmaf(r[c], ap[c], cp[c]), 0.0f), 6.0f);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = std::fmaf(r[c], ap[c], cp[c]);
      }
    }
  });
  return {out, mean, invstd, affine};
}

// Returns (grad_input, grad_weight, grad_bias), each undefined unless asked for. With relu6 (``affine``
// from the forward) the gradient passes where 0 < out < 6, as aten's hardtanh_backward on the output.
std::vector<at::Tensor> backward(const at::Tensor& g_in, const at::Tensor& x, const std::optional<at::Tensor>& affine,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const std::optional<at::Tensor>& weight_o, bool relu6, bool need_input,
                                 bool need_weight, bool need_bias) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t M = N * H * W;
  check_input(x, "input");
  auto g = g_in.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == at::kFloat, "grad_output must match the input");
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  TORCH_CHECK(!relu6 || (affine && affine->dim() == 2 && affine->size(0) == 2 && affine->size(1) == C &&
                          affine->is_contiguous()),
              "relu6 needs the forward's affine (2 x channels)");
  const float* ap = relu6 ? affine->data_ptr<float>() : nullptr;
  const float* bq = relu6 ? ap + C : nullptr;
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const int nt = at::get_num_threads();
  std::vector<double> part(2 * (size_t)nt * C, 0.0);
  at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
    double* s = part.data() + (size_t)2 * at::get_thread_num() * C;
    sums_bwd(gp + b * C, xp + b * C, ap, bq, mp, e - b, C, s, s + C);
  });
  std::vector<double> sum_g(C, 0.0), sum_gx(C, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) { sum_g[c] += part[(size_t)2 * t * C + c]; sum_gx[c] += part[(size_t)2 * t * C + C + c]; }
  at::Tensor gi, gw, gb;
  if (need_weight) {
    gw = at::empty({C}, x.options());
    float* p = gw.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) p[c] = (float)(sum_gx[c] * ip[c]);
  }
  if (need_bias) {
    gb = at::empty({C}, x.options());
    float* p = gb.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) p[c] = (float)sum_g[c];
  }
  if (need_input) {
    const float* wp = weight_o ? weight_o->data_ptr<float>() : nullptr;
    // gi = k1 * (gm - mean(gm) - (x - mean) * invstd^2 * mean(gm * (x - mean)))
    std::vector<float> A(C), B(C), D(C);
    for (int64_t c = 0; c < C; ++c) {
      const double k1 = (double)ip[c] * (wp ? wp[c] : 1.0);
      A[c] = (float)k1;
      B[c] = (float)(-k1 * (double)ip[c] * ip[c] * sum_gx[c] / M);
      D[c] = (float)(-k1 * sum_g[c] / M);
    }
    gi = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    float* gip = gi.data_ptr<float>();
    const float* __restrict__ Ap = A.data();
    const float* __restrict__ Bp = B.data();
    const float* __restrict__ Dp = D.data();
    at::parallel_for(0, M, grain_rows(C), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        const float* __restrict__ gr = gp + m * C;
        const float* __restrict__ xr = xp + m * C;
        float* __restrict__ o = gip + m * C;
        if (ap) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float v = std::fmaf(xr[c], ap[c], bq[c]);
            const float gm = (v > 0.f && v < 6.f) ? gr[c] : 0.f;
            o[c] = Ap[c] * gm + Bp[c] * (xr[c] - mp[c]) + Dp[c];
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = Ap[c] * gr[c] + Bp[c] * (xr[c] - mp[c]) + Dp[c];
        }
      }
    });
  }
  return {gi, gw, gb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
