// Linear products for CPU decoding: y = x @ (w * scale[:, None]).T + bias (summed in float32; y in x's
// dtype: float32, or bfloat16 rounded once from the float32 sum, as torch's .to() rounds), for x (M, K) with
// few rows (a decoding step) and w (N, K) in int8 (with one float32 scale per output row: weight-only
// int8; x float32), bfloat16 (no scale; x float32 or bfloat16) or float32 (x float32), packed as
// described below or plain (row-major, as torch holds a linear's weight).
//
// A decoding step reads every weight once per token, so its speed is the speed at which the weights are
// read: int8 weights are a quarter of float32's bytes, bfloat16 half. Each weight is read once for up to
// 4 rows of x, widened to float32 in registers (AVX-512: 16 at a time, AVX2: 8) and multiplied in
// float32, so the only loss is the weight's own rounding. Blocks of rows are shared over torch's own
// threads (at::parallel_for: the same pool and thread count as torch's products).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define Q2A_AVX2 1
#endif
#if defined(Q2A_AVX2) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 4;   // rows of w per block
constexpr int64_t KB = 32;  // weights of a row per chunk
// w is either plain, (N, K) row-major as torch holds a linear's weight, or packed as (N / NB, K / KB, NB,
// KB): a block's rows chunk by chunk (pack() in generation/weights.py), one sequential stream per thread.
// Either way block b starts at w + b * NB * K; the two differ only in the strides of a row and a chunk.
struct Layout {
  int64_t row;    // from row j of a block to row j + 1, at the same chunk
  int64_t chunk;  // from one chunk of KB weights of a row to the next
};

// Software prefetch: every cache line of a chunk, this many bytes ahead of the stream, into L2 (T1).
// Measured on 24 layers of Qwen2.5-0.5B products at one row (2 threads, weights cold in cache): one line
// per chunk 1 KB ahead (to L1) read 16-19 GB/s; every line 8 KB ahead to L2 22-28 GB/s, float32, bfloat16
// and int8 alike; 8 rows gained as much (the hardware prefetcher alone left the reads short of the memory).
constexpr int64_t AHEAD_BYTES = 8192;

#if defined(Q2A_AVX2) || defined(__AVX512F__)
template <typename T>
inline void prefetch_chunk(const T* p, int64_t row) {
  for (int j = 0; j < NB; ++j) {
    const char* c = reinterpret_cast<const char*>(p + j * row) + AHEAD_BYTES;
    for (int64_t line = 0; line < KB * int64_t(sizeof(T)); line += 64) _mm_prefetch(c + line, _MM_HINT_T1);
  }
}
#endif

// Widening loads: 16 or 8 weights -> float32 lanes; one weight -> float.
struct Int8 {
  using T = int8_t;
#if defined(__AVX512F__)
  static __m512 v16(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#endif
#ifdef Q2A_AVX2
  static __m256 v8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
  static float one(T v) { return float(v); }
};

struct F32 {  // float32 weights as they are: the packing alone (one stream per thread) is the gain
  using T = float;
#if defined(__AVX512F__)
  static __m512 v16(const T* p) { return _mm512_loadu_ps(p); }
#endif
#ifdef Q2A_AVX2
  static __m256 v8(const T* p) { return _mm256_loadu_ps(p); }
#endif
  static float one(T v) { return v; }
};

struct BF16 {  // the upper half of a float32: widening is a 16-bit shift
  using T = uint16_t;
#if defined(__AVX512F__)
  static __m512 v16(const T* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#endif
#ifdef Q2A_AVX2
  static __m256 v8(const T* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
  static float one(T v) {
    const uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

#ifdef Q2A_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One block of NB rows of w (packed, from wb) times MB rows of x (from row m): raw dot products.
template <typename L, int MB>
inline void dots(const typename L::T* wb, Layout lay, const float* x, int64_t K, int64_t m, float out[NB][MB]) {
  const typename L::T* p = wb;
#if defined(__AVX512F__)
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += KB, p += lay.chunk) {
    prefetch_chunk(p, lay.row);
    for (int h = 0; h < KB; h += 16) {
      __m512 xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(x + (m + i) * K + k + h);
      for (int j = 0; j < NB; ++j) {
        const __m512 wv = L::v16(p + j * lay.row + h);
        for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
#elif defined(Q2A_AVX2)
  __m256 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += KB, p += lay.chunk) {
    prefetch_chunk(p, lay.row);
    for (int h = 0; h < KB; h += 8) {
      __m256 xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(x + (m + i) * K + k + h);
      for (int j = 0; j < NB; ++j) {
        const __m256 wv = L::v8(p + j * lay.row + h);
        for (int i = 0; i < MB; ++i) acc[j][i] = _mm256_fmadd_ps(wv, xv[i], acc[j][i]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = hsum(acc[j][i]);
#else
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = 0.f;
  for (int64_t k = 0; k < K; k += KB, p += lay.chunk)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < KB; ++h)
        for (int i = 0; i < MB; ++i) out[j][i] += L::one(p[j * lay.row + h]) * x[(m + i) * K + k + h];
#endif
}

// A block's raw sums (weight rows n.., x rows m..) into y: times the row's scale (if any), plus its bias;
// into a bfloat16 y rounded to nearest even (c10::BFloat16's conversion, the one torch's .to() makes).
template <int MB, typename O>
inline void store(const float (&out)[NB][MB], const float* scale, const float* bias, O* y, int64_t N,
                  int64_t n, int64_t m) {
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i)
      y[(m + i) * N + n + j] = O(out[j][i] * (scale ? scale[n + j] : 1.f) + (bias ? bias[n + j] : 0.f));
}

template <int MB, typename F>
inline void rows_left(int64_t rest, F& f, int64_t blk, int64_t m) {
  if constexpr (MB > 0) {
    if (rest == MB)
      f(blk, m, std::integral_constant<int, MB>{});
    else
      rows_left<MB - 1>(rest, f, blk, m);
  }
}

// Every block of NB weight rows, shared over torch's threads; within a block the rows of x MAX_MB at a
// time (the rest in one smaller group): f(block, first x row, std::integral_constant<int, rows>).
template <int MAX_MB, typename F>
void for_each_block(int64_t M, int64_t N, F&& f) {
  at::parallel_for(0, N / NB, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t m = 0;
      for (; m + MAX_MB <= M; m += MAX_MB) f(blk, m, std::integral_constant<int, MAX_MB>{});
      rows_left<MAX_MB - 1>(M - m, f, blk, m);
    }
  });
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q2A_VNNI 1
// int8 weights with AVX-512 VNNI: the activations are rounded to 16-bit integers per block of XB (each
// block with its own scale: relative error at most 2^-16 of the block's largest, two orders below
// bfloat16's rounding), so that one instruction multiplies 32 weights, widened to 16 bits, and adds
// them in pairs into 32-bit sums (vpdpwssd): 3 instructions per 32 weights instead of 6 per 16. The
// block's integer sums (at most 8 x 127 x 32767 per lane: no overflow) are scaled into float32 sums.
constexpr int64_t XB = 128;

void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs) {
  const int64_t blocks = K / XB;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + m * K + b * XB;
      float amax = 0.f;
      bool finite = true;  // (std::max passes a NaN by; an infinity's scale would make every rounding NaN)
      for (int64_t t = 0; t < XB; ++t) {
        amax = std::max(amax, std::fabs(v[t]));
        finite = finite && std::isfinite(v[t]);
      }
      // a block holding NaN or an infinity: its scale NaN, so that the sums it enters are NaN, as torch's
      // product gives (not finite numbers that decoding would go on with)
      const float inv = finite && amax > 0.f ? 32767.f / amax : 0.f;
      xs[m * blocks + b] = finite ? amax / 32767.f : std::numeric_limits<float>::quiet_NaN();
      int16_t* q = xq + m * K + b * XB;
      for (int64_t t = 0; t < XB; ++t) q[t] = finite ? int16_t(std::nearbyint(v[t] * inv)) : int16_t(0);
    }
}

template <int MB>
inline void dots_vnni(const int8_t* wb, Layout lay, const int16_t* xq, const float* xs, int64_t K, int64_t m,
                      float out[NB][MB]) {
  const int64_t blocks = K / XB;
  __m512 facc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) facc[j][i] = _mm512_setzero_ps();
  const int8_t* p = wb;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i iacc[NB][MB];
    for (int j = 0; j < NB; ++j)
      for (int i = 0; i < MB; ++i) iacc[j][i] = _mm512_setzero_si512();
    for (int64_t c = 0; c < XB / KB; ++c, p += lay.chunk) {
      prefetch_chunk(p, lay.row);
      const int64_t k = b * XB + c * KB;
      __m512i xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_si512(xq + (m + i) * K + k);
      for (int j = 0; j < NB; ++j) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * lay.row)));
        for (int i = 0; i < MB; ++i) iacc[j][i] = _mm512_dpwssd_epi32(iacc[j][i], wv, xv[i]);
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 scale = _mm512_set1_ps(xs[(m + i) * blocks + b]);
      for (int j = 0; j < NB; ++j) facc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[j][i]), scale, facc[j][i]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = _mm512_reduce_add_ps(facc[j][i]);
}

void run_vnni(const int8_t* wp, Layout lay, const float* xp, const float* sp, const float* bp, float* yp, int64_t M,
              int64_t K, int64_t N) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / XB));
  quantize_rows(xp, M, K, xq.data(), xs.data());
  // two rows of x at a time: 2 x 4 integer and float sums fit the 32 registers
  for_each_block<2>(M, N, [&](int64_t blk, int64_t m, auto mb) {
    constexpr int MB = decltype(mb)::value;
    float out[NB][MB];
    dots_vnni<MB>(wp + blk * NB * K, lay, xq.data(), xs.data(), K, m, out);
    store<MB>(out, sp, bp, yp, N, blk * NB, m);
  });
}
#endif

#if defined(__AVX512BF16__)
#define Q2A_BF16DP 1
// bfloat16 weights with bfloat16 activations (a bfloat16 model's) on AVX-512 BF16: vdpbf16ps multiplies
// 32 pairs of bfloat16 values exactly and adds them into 16 float32 sums, with no widening of the weights.
template <int MB>
inline void dots_bf16(const uint16_t* wb, Layout lay, const uint16_t* x, int64_t K, int64_t m, float out[NB][MB]) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_setzero_ps();
  const uint16_t* p = wb;
  for (int64_t k = 0; k < K; k += KB, p += lay.chunk) {
    prefetch_chunk(p, lay.row);
    __m512bh xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(x + (m + i) * K + k);
    for (int j = 0; j < NB; ++j) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(p + j * lay.row);
      for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv, xv[i]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[j][i] = _mm512_reduce_add_ps(acc[j][i]);
}

template <typename O>
void run_bf16(const uint16_t* wp, Layout lay, const uint16_t* xp, const float* bp, O* yp, int64_t M, int64_t K, int64_t N) {
  for_each_block<4>(M, N, [&](int64_t blk, int64_t m, auto mb) {
    constexpr int MB = decltype(mb)::value;
    float out[NB][MB];
    dots_bf16<MB>(wp + blk * NB * K, lay, xp, K, m, out);
    store<MB>(out, nullptr, bp, yp, N, blk * NB, m);
  });
}
#endif

// Whether int8 products take the VNNI path (the activations then rounded to 16 bits per block).
bool vnni_for(int64_t K) {
#ifdef Q2A_VNNI
  return K % XB == 0;
#else
  (void)K;
  return false;
#endif
}

template <typename L, typename O = float>
void run(const typename L::T* wp, Layout lay, const float* xp, const float* sp, const float* bp, O* yp, int64_t M,
         int64_t K, int64_t N) {
  for_each_block<4>(M, N, [&](int64_t blk, int64_t m, auto mb) {
    constexpr int MB = decltype(mb)::value;
    float out[NB][MB];
    dots<L, MB>(wp + blk * NB * K, lay, xp, K, m, out);
    store<MB>(out, sp, bp, yp, N, blk * NB, m);
  });
}

const float* optional_floats(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n && t->device().is_cpu(),
              "packed_linear: ", what, " must be a contiguous float32 CPU tensor of the output size");
  return t->data_ptr<float>();
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && (w.dim() == 2 || w.dim() == 4),
              "packed_linear: x (M, K); w plain (N, K) or packed (N/4, K/32, 4, 32)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16),
              "packed_linear: x must be float32 (or bfloat16 with bfloat16 weights)");
  TORCH_CHECK(w.scalar_type() == at::kChar || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
              "packed_linear: w must be int8, bfloat16 or float32");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "packed_linear: contiguous inputs");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "packed_linear: CPU tensors");
  const bool packed = w.dim() == 4;
  const int64_t M = x.size(0), K = x.size(1), N = packed ? w.size(0) * NB : w.size(0);
  TORCH_CHECK(packed ? (w.size(1) * KB == K && w.size(2) == NB && w.size(3) == KB) : w.size(1) == K,
              "packed_linear: shapes do not match");
  TORCH_CHECK(N % NB == 0 && K % KB == 0, "packed_linear: out features must be a multiple of ", NB,
              " and in features of ", KB);
  const Layout lay = packed ? Layout{KB, NB * KB} : Layout{K, KB};
  const float* sp = optional_floats(scale, N, "scale");
  TORCH_CHECK(x.scalar_type() != at::kBFloat16 || sp == nullptr, "packed_linear: bfloat16 weights take no scale");
  const float* bp = optional_floats(bias, N, "bias");
  TORCH_CHECK(w.scalar_type() != at::kChar || sp != nullptr, "packed_linear: int8 weights need their scale");
  // bfloat16 activations give a bfloat16 y: a bfloat16 model's products each spared two conversions
  // in torch (the activations widened, the sums narrowed), ~2 % of a decoding step
  at::Tensor y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    auto* yb = y.data_ptr<at::BFloat16>();
#ifdef Q2A_BF16DP
    run_bf16(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), lay, xb, bp, yb, M, K, N);
#else
    std::vector<float> xf(M * K);  // a few rows: widened exactly, here rather than by a torch op
    for (int64_t t = 0; t < M * K; ++t) xf[t] = BF16::one(xb[t]);
    run<BF16>(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), lay, xf.data(), sp, bp, yb, M, K, N);
#endif
    return y;
  }
  if (w.scalar_type() == at::kChar && vnni_for(K)) {
#ifdef Q2A_VNNI
    run_vnni(w.data_ptr<int8_t>(), lay, x.data_ptr<float>(), sp, bp, y.data_ptr<float>(), M, K, N);
#endif
  } else if (w.scalar_type() == at::kChar)
    run<Int8>(w.data_ptr<int8_t>(), lay, x.data_ptr<float>(), sp, bp, y.data_ptr<float>(), M, K, N);
  else if (w.scalar_type() == at::kFloat)
    run<F32>(w.data_ptr<float>(), lay, x.data_ptr<float>(), sp, bp, y.data_ptr<float>(), M, K, N);
  else
    run<BF16>(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), lay, x.data_ptr<float>(), sp, bp,
              y.data_ptr<float>(), M, K, N);
  return y;
}

// ---- Attention of one new token over the KV cache (a decoding step), float32 ----
// softmax(q k^T * scale, masked) v for q (B, H, 1, D) and k, v (B, G, S, D) views of the cache (any
// strides but the last), H = G x heads per group. Each (row, kv head) pair is one task: its keys are read
// once for all the query heads of its group, then its values once; a step thus reads the cache once.
// torch's CPU attention took 200-300 us per layer for one query over 840 cached positions (the cache
// cold after a step's weights went through the caches), most of it waiting on memory.
constexpr int64_t ROWS_AHEAD = 16;  // cached rows of keys / values prefetched ahead of the one in use

inline void prefetch_row(const float* p, int64_t n) {
#if defined(Q2A_AVX2) || defined(__AVX512F__)
  for (int64_t d = 0; d < n; d += 16) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
#else
  (void)p, (void)n;
#endif
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(Q2A_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  sum = hsum(acc);
#endif
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Four dot products of a with b0..b3. On AVX2 in four running sums, reduced together (three horizontal
// adds for the four, where each alone takes a chain of six operations); elsewhere four dot()s.
inline void dot4(const float* a, const float* const b[4], int64_t n, float out[4]) {
#if defined(Q2A_AVX2) && !defined(__AVX512F__)
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m256 av = _mm256_loadu_ps(a + d);
    for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b[i] + d), acc[i]);
  }
  // [s0 s1 s2 s3 | s0 s1 s2 s3] (each lane half a sum), then the two halves added
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  for (; d < n; ++d)
    for (int i = 0; i < 4; ++i) out[i] += a[d] * b[i][d];
#else
  for (int i = 0; i < 4; ++i) out[i] = dot(a, b[i], n);
#endif
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a x
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 av = _mm512_set1_ps(a);
  for (; d + 16 <= n; d += 16) _mm512_storeu_ps(y + d, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
#elif defined(Q2A_AVX2)
  const __m256 av = _mm256_set1_ps(a);
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
#endif
  for (; d < n; ++d) y[d] += a * x[d];
}

// p[s] = exp(p[s] - top) for s < n (exp(-inf) = 0), returning their sum. The scalar std::exp took about
// half of the attention's time (one call per query head and cached position: 5,880 a layer for 7 heads
// over 840 positions); AVX-512 computes 16 at a time, AVX2 8, with Cephes' expf (a degree-6 polynomial
// after reducing by ln 2; within 2 ulp of std::exp over the softmax's range, x <= 0).
inline float exp_shifted(float* p, int64_t n, float top) {
  int64_t s = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top), lo = _mm512_set1_ps(-87.33654f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  __m512 acc = _mm512_setzero_ps();
  for (; s + 16 <= n; s += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(p + s), shift);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);  // below: exp underflows (and -inf: masked)
    const __m512 xc = _mm512_max_ps(x, lo);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(xc, _mm512_mul_ps(k, c1)), _mm512_mul_ps(k, c2));
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512 e = _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, k));
    _mm512_storeu_ps(p + s, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif defined(Q2A_AVX2)
  // the same polynomial 8 at a time; 2^k built in the exponent field (k >= -126 here: a normal number)
  const __m256 shift = _mm256_set1_ps(top), lo = _mm256_set1_ps(-87.33654f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  __m256 acc = _mm256_setzero_ps();
  for (; s + 8 <= n; s += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p + s), shift);
    const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // below: exp underflows (and -inf: masked)
    const __m256 xc = _mm256_max_ps(x, lo);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(k, c1)), _mm256_mul_ps(k, c2));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256 two_k = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
    const __m256 e = _mm256_and_ps(keep, _mm256_mul_ps(y, two_k));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; s < n; ++s) sum += (p[s] = std::exp(p[s] - top));
  return sum;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "decode_attention: q (B, H, 1, D), k and v (B, G, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32 q, k and v");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), G = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && G > 0 && H % G == 0,
              "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v rows must be contiguous");
  const at::Tensor qc = q.contiguous();
  const bool* mp = nullptr;
  at::Tensor mc;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == S,
                "decode_attention: mask (B, S) bool, true where a key may be attended");
    mc = mask->contiguous();
    mp = mc.data_ptr<bool>();
  }
  at::Tensor out = at::zeros({B, H, 1, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t per = H / G;
  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(per * S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, g = t % G;
      const float* kb = kp + b * k.stride(0) + g * k.stride(1);
      const float* vb = vp + b * v.stride(0) + g * v.stride(1);
      const float* qh = qp + (b * H + g * per) * D;
      float* oh = op + (b * H + g * per) * D;
      // This row's own length: up to its last position that may be attended. The rest of the step's width
      // (set by the longest row beside it) is masked; left in the loops, it moved where the vector blocks
      // end and the scalar tails begin, so a row's sums rounded otherwise beside a longer row than alone.
      int64_t n = S;
      if (mp != nullptr)
        while (n > 0 && !mp[b * S + n - 1]) --n;
      int64_t s = 0;
      for (; s + 4 <= n; s += 4) {  // four cached rows at a time: each query head's four scores together
        const float* rows[4];
        bool keep[4];  // read once for all query heads (the compiler, seeing stores to p, reads a mask again)
        for (int i = 0; i < 4; ++i) {
          rows[i] = kb + (s + i) * k.stride(2);
          prefetch_row(rows[i] + ROWS_AHEAD * k.stride(2), D);
          keep[i] = mp == nullptr || mp[b * S + s + i];
        }
        for (int64_t h = 0; h < per; ++h) {
          float d4[4];
          dot4(qh + h * D, rows, D, d4);
          for (int i = 0; i < 4; ++i) p[h * S + s + i] = keep[i] ? d4[i] * float(scale) : -INFINITY;
        }
      }
      for (; s < n; ++s) {
        const bool keep = mp == nullptr || mp[b * S + s];
        const float* kr = kb + s * k.stride(2);
        prefetch_row(kr + ROWS_AHEAD * k.stride(2), D);
        for (int64_t h = 0; h < per; ++h)
          p[h * S + s] = keep ? dot(qh + h * D, kr, D) * float(scale) : -INFINITY;
      }
      for (int64_t h = 0; h < per; ++h) {
        float* ph = p.data() + h * S;
        float top = -INFINITY;
        for (int64_t s = 0; s < n; ++s) top = std::max(top, ph[s]);
        float sum = 0.f;
        if (top == -INFINITY) {  // nothing to attend: zeros, as the output of an all-masked row
          for (int64_t s = 0; s < n; ++s) ph[s] = 0.f;
          continue;
        }
        sum = exp_shifted(ph, n, top);
        const float inv = 1.f / sum;
        for (int64_t s = 0; s < n; ++s) ph[s] *= inv;
      }
      for (int64_t s = 0; s < n; ++s) {
        const float* vr = vb + s * v.stride(2);
        prefetch_row(vr + ROWS_AHEAD * v.stride(2), D);
        for (int64_t h = 0; h < per; ++h)
          if (p[h * S + s] != 0.f) axpy(oh + h * D, p[h * S + s], vr, D);
      }
    }
  });
  return out;
}

// ---- The small steps between a decoding step's products: RMSNorm and RoPE, one call each ----
// A decoding step of a 0.5B model spends ~0.25 ms a layer outside its products, most of it in the ~20
// small torch ops of its two norms and the rotary embedding of q and k (each a dispatch, an allocation
// and a pass over a few hundred values). These compute the same arithmetic in one pass, rounding where
// torch rounds: in a bfloat16 model each intermediate torch would store in bfloat16 is rounded to it here
// too (the library is built with -ffp-contract=off, so no product is fused into an addition either).
template <typename T>
inline float f32(T v) { return float(v); }

template <typename T>
inline T narrow(float v) { return T(v); }  // c10::BFloat16(float) rounds to nearest even, as torch does

template <typename T>
void rms_norm_rows(const T* x, int64_t x_row, const T* w, T* y, int64_t M, int64_t D, float eps) {
  at::parallel_for(0, M, 32, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * x_row;
      float part[16] = {0.f};  // 16 running sums: the compiler keeps them in one vector register
      int64_t d = 0;
      for (; d + 16 <= D; d += 16)
        for (int j = 0; j < 16; ++j) {
          const float v = f32(xr[d + j]);
          part[j] += v * v;
        }
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += part[j];
      for (; d < D; ++d) sum += f32(xr[d]) * f32(xr[d]);
      // the reference: h = x.float(); h * rsqrt(mean(h^2) + eps), cast to x's dtype, times the weight
      const float r = 1.f / std::sqrt(sum / float(D) + eps);
      T* yr = y + m * D;
      for (d = 0; d < D; ++d) yr[d] = narrow<T>(f32(w[d]) * f32(narrow<T>(f32(xr[d]) * r)));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: x and weight both float32 or both bfloat16");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.is_contiguous(), "rms_norm: weight (D,) for x (..., D)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t M = D ? x.numel() / D : 0;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows<float>(xc.data_ptr<float>(), D, weight.data_ptr<float>(), y.data_ptr<float>(), M, D, float(eps));
  else
    rms_norm_rows<at::BFloat16>(xc.data_ptr<at::BFloat16>(), D, weight.data_ptr<at::BFloat16>(),
                                y.data_ptr<at::BFloat16>(), M, D, float(eps));
  return y;
}

// Rotate-half RoPE in place on x (B, H, T, D), any strides but the last: x * cos + rotate_half(x) * sin
// with cos, sin (B or 1, 1, T, D). As the reference: each product rounded to x's dtype, then their sum.
template <typename T>
void rope_rows(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3), half = D / 2;
  T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), sb = sin.size(0) == 1 ? 0 : sin.stride(0);
  at::parallel_for(0, B * H * T_, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> out(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T_), h = (i / T_) % H, t = i % T_;
      T* r = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      const T* c = cp + b * cb + t * cos.stride(2);
      const T* s = sp + b * sb + t * sin.stride(2);
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = f32(r[d]), x2 = f32(r[d + half]);
        out[d] = f32(narrow<T>(f32(narrow<T>(x1 * f32(c[d]))) + f32(narrow<T>(-x2 * f32(s[d])))));
        out[d + half] = f32(narrow<T>(f32(narrow<T>(x2 * f32(c[d + half]))) + f32(narrow<T>(x1 * f32(s[d + half])))));
      }
      for (int64_t d = 0; d < D; ++d) r[d] = narrow<T>(out[d]);
    }
  });
}

void rope_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* t : {(const at::Tensor*)&q, (const at::Tensor*)&k, &cos, &sin})
    TORCH_CHECK(t->dim() == 4 && t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->stride(3) == 1,
                "rope_: q, k (B, H, T, D), cos, sin (B, 1, T, D): CPU tensors of one dtype, the last dim contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "rope_: float32 or bfloat16");
  for (const at::Tensor* t : {(const at::Tensor*)&q, (const at::Tensor*)&k}) {
    TORCH_CHECK(t->size(0) == q.size(0) && t->size(2) == cos.size(2) && t->size(3) == cos.size(3) &&
                cos.sizes() == sin.sizes() && cos.size(1) == 1 && (cos.size(0) == 1 || cos.size(0) == t->size(0)) &&
                t->size(3) % 2 == 0, "rope_: shapes do not match");
  }
  if (q.scalar_type() == at::kFloat) {
    rope_rows<float>(q, cos, sin);
    rope_rows<float>(k, cos, sin);
  } else {
    rope_rows<at::BFloat16>(q, cos, sin);
    rope_rows<at::BFloat16>(k, cos, sin);
  }
}

}  // namespace

TORCH_LIBRARY(qwen2audio, m) {
  m.def("packed_linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(qwen2audio, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_", &rope_);
}

// For the tests and the docs: whether this build rounds int8 products' activations to 16 bits (VNNI).
TORCH_LIBRARY_FRAGMENT(qwen2audio, m) {
  m.def("int8_rounds_activations() -> bool", []() -> bool {
#ifdef Q2A_VNNI
    return true;
#else
    return false;
#endif
  });
}
