// The weight gradient of a depthwise convolution over channels_last float32 CPU tensors:
// gw[c, 0, i, j] = sum_{n, ho, wo} x[n, c, ho*s - p + i, wo*s - p + j] * g[n, c, ho, wo].
// densenas/native/__init__.py builds it and densenas/ops.py (DepthwiseConv2d) decides when to use it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kUnit = 8;  // channels per unit of parallel work (one AVX2 register of floats)

// A[c0, c0 + CB) += sum over wo in [wo0, wo1) of x row at column wo*s + off times g row at column wo.
// The CB partial sums stay in registers across the row; channels are contiguous in both rows. Every
// width rounds each product-add once (fused), so a channel's sum does not depend on which width ran it.
template <int CB>
inline void row_dot(float* __restrict__ A, const float* __restrict__ xrow, const float* __restrict__ grow,
                    int64_t c0, int64_t C, int64_t wo0, int64_t wo1, int64_t s, int64_t off) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (CB % 8 == 0) {
    constexpr int R = CB / 8;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_loadu_ps(A + c0 + 8 * r);
    for (int64_t wo = wo0; wo < wo1; ++wo) {
      const float* xp = xrow + (wo * s + off) * C + c0;
      const float* gp = grow + wo * C + c0;
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8 * r), _mm256_loadu_ps(gp + 8 * r), acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(A + c0 + 8 * r, acc[r]);
    return;
  }
#endif
  float acc[CB];
  for (int q = 0; q < CB; ++q) acc[q] = A[c0 + q];
  for (int64_t wo = wo0; wo < wo1; ++wo) {
    const float* __restrict__ xp = xrow + (wo * s + off) * C + c0;
    const float* __restrict__ gp = grow + wo * C + c0;
    for (int q = 0; q < CB; ++q) acc[q] = std::fma(xp[q], gp[q], acc[q]);
  }
  for (int q = 0; q < CB; ++q) A[c0 + q] = acc[q];
}
}  // namespace

torch::Tensor weight_grad(const torch::Tensor& x, const torch::Tensor& g, int64_t k, int64_t s, int64_t p) {
  TORCH_CHECK(x.dim() == 4 && g.dim() == 4 && x.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat &&
                  x.device().is_cpu() && g.device().is_cpu(),
              "dw_conv.weight_grad: float32 CPU NCHW tensors expected, got ", x.sizes(), " and ", g.sizes());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && g.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dw_conv.weight_grad: both tensors must be channels_last contiguous");
  TORCH_CHECK(k >= 1 && s >= 1 && p >= 0, "dw_conv.weight_grad: bad kernel / stride / padding");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = g.size(2), Wo = g.size(3);
  TORCH_CHECK(g.size(0) == N && g.size(1) == C && Ho == (H + 2 * p - k) / s + 1 && Wo == (W + 2 * p - k) / s + 1,
              "dw_conv.weight_grad: grad_output ", g.sizes(), " does not match input ", x.sizes(), " with kernel ", k,
              ", stride ", s, ", padding ", p);
  const float* X = x.data_ptr<float>();
  const float* G = g.data_ptr<float>();
  // acc[i * k + j][c]: each thread owns whole units of channels, so no two threads write the same sum and
  // the result does not depend on the thread count.
  auto acc = torch::zeros({k * k, C}, x.options());
  float* A = acc.data_ptr<float>();
  const int64_t units = (C + kUnit - 1) / kUnit;
  at::parallel_for(0, units, 1, [&](int64_t ub, int64_t ue) {
    const int64_t cb = ub * kUnit, ce = std::min(C, ue * kUnit);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t ho = 0; ho < Ho; ++ho) {
        const float* grow = G + (n * Ho + ho) * Wo * C;
        for (int64_t i = 0; i < k; ++i) {
          const int64_t hi = ho * s - p + i;
          if (hi < 0 || hi >= H) continue;
          const float* xrow = X + (n * H + hi) * W * C;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t off = j - p;  // input column = wo * s + off
            int64_t wo0 = 0, wo1 = Wo;
            while (wo0 < Wo && wo0 * s + off < 0) ++wo0;
            while (wo1 > wo0 && (wo1 - 1) * s + off >= W) --wo1;
            float* Aij = A + (i * k + j) * C;
            int64_t c = cb;
            for (; c + 32 <= ce; c += 32) row_dot<32>(Aij, xrow, grow, c, C, wo0, wo1, s, off);
            for (; c + 8 <= ce; c += 8) row_dot<8>(Aij, xrow, grow, c, C, wo0, wo1, s, off);
            for (; c < ce; ++c) row_dot<1>(Aij, xrow, grow, c, C, wo0, wo1, s, off);
          }
        }
      }
    }
  });
  return acc.t().contiguous().view({C, 1, k, k});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("weight_grad", &weight_grad); }
