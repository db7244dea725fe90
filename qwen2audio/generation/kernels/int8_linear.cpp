// Weight-only int8 linear for CPU decoding: y = x @ (w * scale[:, None]).T + bias, with w int8 (N, K)
// (packed, see below), one float32 scale per output row, x float32 (M, K) with few rows (a decoding step).
//
// A decoding step reads every weight once per token, so its speed is the speed at which the weights are
// read: int8 weights are a quarter of float32's bytes. Each weight is read once for up to 4 rows of x,
// converted to float32 in registers (AVX-512: 16 at a time, AVX2: 8) and multiplied in float32, so the
// only loss is the weight's rounding. Rows of w are shared over torch's own threads
// (at::parallel_for: the same pool and thread count as torch's products).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#define Q2A_AVX2 1
#endif
#if defined(Q2A_AVX2) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 4;   // rows of w per block
constexpr int64_t KB = 16;  // weights of a row per chunk
// w is packed as (N / NB, K / KB, NB, KB): a block's rows chunk by chunk, so that each thread reads
// one sequential stream of memory (the layout int8_pack in weights.py makes).

#if defined(__AVX512F__)
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif
#ifdef Q2A_AVX2
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One block of NB rows of w (packed, from wb) times MB rows of x (from row m): raw dot products.
template <int MB>
inline void dots(const int8_t* wb, const float* x, int64_t K, int64_t m, float out[NB][MB]) {
#if defined(__AVX512F__)
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_setzero_ps();
  const int8_t* p = wb;
  for (int64_t k = 0; k < K; k += KB, p += NB * KB) {
    _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
    __m512 xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(x + (m + i) * K + k);
    for (int j = 0; j < NB; ++j) {
      const __m512 wv = load16(p + j * KB);
      for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
#elif defined(Q2A_AVX2)
  __m256 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm256_setzero_ps();
  const int8_t* p = wb;
  for (int64_t k = 0; k < K; k += KB, p += NB * KB) {
    _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
    for (int h = 0; h < KB; h += 8) {
      __m256 xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(x + (m + i) * K + k + h);
      for (int j = 0; j < NB; ++j) {
        const __m256 wv = load8(p + j * KB + h);
        for (int i = 0; i < MB; ++i) acc[j][i] = _mm256_fmadd_ps(wv, xv[i], acc[j][i]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = hsum(acc[j][i]);
#else
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = 0.f;
  const int8_t* p = wb;
  for (int64_t k = 0; k < K; k += KB, p += NB * KB)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < KB; ++h)
        for (int i = 0; i < MB; ++i) out[j][i] += float(p[j * KB + h]) * x[(m + i) * K + k + h];
#endif
}

template <int MB>
inline void block(const int8_t* wb, const float* x, const float* scale, const float* bias, float* y, int64_t K,
                  int64_t N, int64_t n, int64_t m) {
  float out[NB][MB];
  dots<MB>(wb, x, K, m, out);
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i)
      y[(m + i) * N + n + j] = out[j][i] * scale[n + j] + (bias ? bias[n + j] : 0.f);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 4 && scale.dim() == 1,
              "int8_linear: x (M, K), w packed (N/4, K/16, 4, 16), scale (N)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_linear: x float32, w int8, scale float32");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scale.is_contiguous(), "int8_linear: contiguous inputs");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "int8_linear: CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * NB;
  TORCH_CHECK(w.size(1) * KB == K && w.size(2) == NB && w.size(3) == KB && scale.size(0) == N,
              "int8_linear: shapes do not match");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "int8_linear: bias float32 (N)");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / NB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int8_t* wb = wp + blk * NB * K;
      const int64_t n = blk * NB;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) block<4>(wb, xp, sp, b, yp, K, N, n, m);
      switch (M - m) {
        case 3: block<3>(wb, xp, sp, b, yp, K, N, n, m); break;
        case 2: block<2>(wb, xp, sp, b, yp, K, N, n, m); break;
        case 1: block<1>(wb, xp, sp, b, yp, K, N, n, m); break;
        default: break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(qwen2audio, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2audio, CPU, m) {
  m.impl("int8_linear", &int8_linear);
}
