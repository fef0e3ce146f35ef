// The decode kernels: perf/kernels.py builds this file once (-O3 -march=native -fopenmp) and says what each does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
#include <cmath>
#include <algorithm>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(64)));          // 16 floats: one AVX-512 register
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vub __attribute__((vector_size(16)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

static inline float sum16(vf v) {  // a tree of adds, not a chain of 16
#ifdef __AVX512F__
  return _mm512_reduce_add_ps((__m512)v);  // in registers (shuffles), not through memory
#endif
  float s[16]; std::memcpy(s, &v, 64);
  for (int w = 8; w > 0; w /= 2) for (int k = 0; k < w; k++) s[k] += s[k + w];
  return s[0];
}
static inline float half(const uint8_t* p) { _Float16 h; std::memcpy(&h, p, 2); return (float)h; }
static inline vf loadf(const float* p) { vf v; std::memcpy(&v, p, 64); return v; }
static inline vf widen_u8(vub b) { return __builtin_convertvector(__builtin_convertvector(b, vi), vf); }
// signed bytes as unsigned + 128: GCC scalarizes a vector conversion of int8 (measured 7x slower), not of uint8
static inline vf widen_i8(const uint8_t* p) { vub b; std::memcpy(&b, p, 16); return widen_u8(b ^ 0x80) - 128.f; }
static inline vf widen_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
  vh h; std::memcpy(&h, p, 32); vu u = __builtin_convertvector(h, vu) << 16; vf f; std::memcpy(&f, &u, 64); return f;
}

enum Kind { F32, BF16, Q8_0, Q4_0, Q4_1 };

// Block b of a weight row, dequantized: its 32 weights as w0 (weights 0..15) and w1 (16..31), fp32.
template <int KIND>
static inline void block(const uint8_t* r, int64_t b, vf& w0, vf& w1) {
  if (KIND == F32) { w0 = loadf((const float*)r + 32 * b); w1 = loadf((const float*)r + 32 * b + 16); }
  if (KIND == BF16) { w0 = widen_bf16((const uint16_t*)r + 32 * b); w1 = widen_bf16((const uint16_t*)r + 32 * b + 16); }
  if (KIND == Q8_0) {
    const uint8_t* k = r + 34 * b;
    const float d = half(k);
#ifdef __AVX512F__  // one sign-extending move per 16 bytes
    w0 = (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(k + 2)))) * d;
    w1 = (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(k + 18)))) * d;
#else
    w0 = widen_i8(k + 2) * d; w1 = widen_i8(k + 18) * d;
#endif
  }
  if (KIND == Q4_0 || KIND == Q4_1) {
    const uint8_t* k = r + (KIND == Q4_0 ? 18 : 20) * b;
#ifdef __AVX512F__
    // the block's 16 possible values d·q + zero as a table, indexed by the nibbles (vpermps reads an index's
    // low 4 bits): 1.3x the weights per second of converting every nibble (GCC's vector extension
    // scalarizes the same shuffle, hence intrinsics). Q4_0: zero = -8·d; Q4_1: fp16 d and m side by side.
    uint32_t dm32 = 0; std::memcpy(&dm32, k, KIND == Q4_0 ? 2 : 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm32));  // (d, m or 0, 0, 0)
    const __m512 iota = KIND == Q4_0 ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
                                     : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(dm), _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
    const __m128i q = _mm_loadu_si128((const __m128i*)(k + (KIND == Q4_0 ? 2 : 4)));
    w0 = (vf)_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q), table);
    w1 = (vf)_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_srli_epi16(q, 4)), table);
#else
    const float d = half(k), zero = KIND == Q4_0 ? -8.f * d : half(k + 2);
    vub q; std::memcpy(&q, k + (KIND == Q4_0 ? 2 : 4), 16);
    w0 = widen_u8(q & 15) * d + zero; w1 = widen_u8(q >> 4) * d + zero;
#endif
  }
}

// y[m * ldy + n] for rows n in [n0, n1) of one matrix, R weight rows at a time: each weight block is decoded
// once and used for the M activation rows, each activation load for the R weight rows.
template <int M, int KIND, int R = 1>
static void rows_of(const float* x, const uint8_t* w, int64_t row_bytes, float* y, int64_t ldy, int64_t K,
                    int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += R) {
    vf acc0[R][M] = {}, acc1[R][M] = {};  // two chains of adds, not one
    for (int64_t b = 0; b < K / 32; b++) {
      vf w0[R], w1[R];
      for (int r = 0; r < R; r++) block<KIND>(w + (n + r) * row_bytes, b, w0[r], w1[r]);
      for (int m = 0; m < M; m++) {
        const vf x0 = loadf(x + m * K + 32 * b), x1 = loadf(x + m * K + 32 * b + 16);
        for (int r = 0; r < R; r++) { acc0[r][m] += w0[r] * x0; acc1[r][m] += w1[r] * x1; }
      }
    }
    for (int r = 0; r < R; r++)
      for (int m = 0; m < M; m++) y[m * ldy + n + r] = sum16(acc0[r][m] + acc1[r][m]);
  }
}

// rows_of, but when the M activation rows outgrow L1 (32 KB: 8 rows of K = 2048 are 64 KB, read again
// for every weight row), 16 weight rows at a time, two by two, for the first 4 activation rows, then for
// the others, the weights still in L2: a 2048 x 768 matrix at 8 rows, bf16 645 -> 348 us, Q8_0 574 -> 392.
// A row's sums are the same whichever way it is reached.
template <int M, int KIND>
static void rows(const float* x, const uint8_t* w, int64_t row_bytes, float* y, int64_t ldy, int64_t K,
                 int64_t n0, int64_t n1) {
  if (M <= 4 || M * K * 4 <= 32768) return rows_of<M, KIND>(x, w, row_bytes, y, ldy, K, n0, n1);
  constexpr int rest = M > 4 ? M - 4 : 1;
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    rows_of<4, KIND, 2>(x, w, row_bytes, y, ldy, K, n, n + 16);
    rows_of<rest, KIND, 2>(x + 4 * K, w, row_bytes, y + 4 * ldy, ldy, K, n, n + 16);
  }
  rows_of<M, KIND>(x, w, row_bytes, y, ldy, K, n, n1);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define INT8_DOTS 1
// Q4 weights meet activations held as integers: a vpdpwssd multiplies 32 pairs of 16-bit integers in one
// instruction, where fp32 takes 16 FMAs after a table lookup. llama.cpp rounds each block of 32 activations
// to int8 (d = max|x| / 127); on SmolLM2, whose residual stream holds a few huge channels, that alone
// turns "The capital of France is Paris." into "L'Étoile, la Marseillaise, ..." (llama.cpp answers the
// same). So the rounding error is rounded again: x ≈ d·(q1 + q2/254), q1 = round(x/d), q2 = round((x -
// d·q1)·254/d), about 15 bits, logits within ~1e-3 of fp32 activations; held as one int16 c = 254·q1 + q2
// (|c| <= 32385), x̂ = (d/254)·c. Per row and pair of blocks: 2 loads, 2 vpdpwssd, 1 conversion and 2
// float ops, where two int8 dots (vpdpbusd) took 8 vector ops; that per-row work is what bounds batch 8.
// Q8_0 and float weights keep fp32 activations.
//
// Blocks go in pairs (b0, b1). Unpacked, a pair's 64 nibbles lie as L = [b0 w0-15 | b1 w0-15 | b0 w16-31 |
// b1 w16-31] (low nibbles = weights 0-15, high = 16-31), one byte each; as 16-bit words, A = L's even
// bytes, B = its odd ones, so that int32 lane j sums L[4j .. 4j+3] over both: lanes 0-3 and 8-11 belong to
// b0, 4-7 and 12-15 to b1, and each lane's scale d/254 is stored per lane. The zero points' share
// m·Σx̂ is one FMA per pair for all rows at once (a lane per row).
struct Int8Rows {
  int64_t pairs = 0;
  std::vector<int16_t> c;  // (M, pairs, 64): the pair's A words, then its B words
  std::vector<float> d;    // (M, pairs, 16): each lane's block scale / 254
  std::vector<float> s;    // (pairs, 2, 8): Σ x̂ of block (pair, b) for each row (8 lanes)
};

static Int8Rows int8_rows(const float* X, int64_t M, int64_t K) {
  Int8Rows a;
  a.pairs = K / 64;  // an odd last block stays fp32 (rows_int8)
  a.c.assign(M * a.pairs * 64, 0); a.d.assign(M * a.pairs * 16, 0.f); a.s.assign(a.pairs * 16, 0.f);
  const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // std::nearbyint's ties to even
  for (int64_t m = 0; m < M; m++)
    for (int64_t b = 0; b < 2 * a.pairs; b++) {
      const float* x = X + m * K + 32 * b;
      const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
      const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi))) / 127;
      const __m512 inv = _mm512_set1_ps(d > 0 ? 1 / d : 0), dv = _mm512_set1_ps(d), k254 = _mm512_set1_ps(254);
      int32_t c[32];
      for (int h = 0; h < 2; h++) {
        const __m512 v = h ? hi : lo;
        const __m512 q1 = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), round);
        const __m512 q2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_fnmadd_ps(q1, dv, v), inv), k254), round);
        _mm512_storeu_si512(c + 16 * h, _mm512_cvtps_epi32(_mm512_fmadd_ps(q1, k254, q2)));  // exact: small integers
      }
      const int64_t p = b / 2, half = b % 2;
      int16_t* A = &a.c[(m * a.pairs + p) * 64]; int16_t* B = A + 32;
      int32_t sum = 0;
      for (int i = 0; i < 32; i++) {  // L index (i < 16 ? 0 : 32) + 16·half + i % 16; A takes the even ones
        const int64_t at = (i < 16 ? 0 : 32) + 16 * half + i % 16;
        (at % 2 ? B : A)[at / 2] = (int16_t)c[i];
        sum += c[i];
      }
      for (int lane = 0; lane < 4; lane++)
        for (int upper = 0; upper < 2; upper++) a.d[(m * a.pairs + p) * 16 + 8 * upper + 4 * half + lane] = d / 254;
      a.s[(p * 2 + half) * 8 + m] = d / 254 * (float)sum;  // Σc exact in fp32: |Σc| <= 32 · 32385 < 2^24
    }
  return a;
}

// rows() for Q4_0 / Q4_1 weights and integer activations: w = d·q + m per block (Q4_0: m = -8·d), so
// Σ w·x̂ = d·(d_x/254)·Σ q·c + m·Σ x̂.
template <int M, int KIND>
static void rows_int8(const Int8Rows& a, const float* x, const uint8_t* w, int64_t row_bytes, float* y,
                      int64_t ldy, int64_t K, int64_t n0, int64_t n1) {
  const int64_t B = KIND == Q4_0 ? 18 : 20, head = B - 16;  // bytes per block, of which d (and m) first
  const __m512i lanes_d = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i low = _mm256_set1_epi8(15);
  const __m512i even = _mm512_set1_epi16(0x00FF);
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* r = w + n * row_bytes;
    __m512 acc[M];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    __m256 zero = _mm256_setzero_ps();  // m·Σx̂ of each row (a lane per row)
    for (int64_t p = 0; p < a.pairs; p++) {
      const uint8_t* k0 = r + 2 * p * B; const uint8_t* k1 = k0 + B;
      uint32_t h0 = 0, h1 = 0; std::memcpy(&h0, k0, head); std::memcpy(&h1, k1, head);
      __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)h0), (int)h1, 1));  // (d0, m0, d1, m1)
      if (KIND == Q4_0) dm = _mm_mul_ps(_mm_moveldup_ps(dm), _mm_setr_ps(1, -8, 1, -8));  // m = -8·d
      const __m512 d = _mm512_permutexvar_ps(lanes_d, _mm512_broadcast_f32x4(dm));
      const __m256 m0 = _mm256_broadcastss_ps(_mm_movehdup_ps(dm)), m1 = _mm256_broadcastss_ps(_mm_shuffle_ps(dm, dm, 3));
      zero = _mm256_fmadd_ps(m1, _mm256_loadu_ps(&a.s[p * 16 + 8]), _mm256_fmadd_ps(m0, _mm256_loadu_ps(&a.s[p * 16]), zero));
      const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(k0 + head))),
                                                _mm_loadu_si128((const __m128i*)(k1 + head)), 1);  // (b0, b1) nibbles
      const __m512i L = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, low)),
                                           _mm256_and_si256(_mm256_srli_epi16(q, 4), low), 1);
      const __m512i wa = _mm512_and_si512(L, even), wb = _mm512_srli_epi16(L, 8);  // 16-bit words
      for (int m = 0; m < M; m++) {
        const int64_t at = m * a.pairs + p;
        const int16_t* c = &a.c[at * 64];
        const __m512i dots = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), wa, _mm512_loadu_si512(c)),
                                                 wb, _mm512_loadu_si512(c + 32));
        acc[m] = _mm512_fmadd_ps(d, _mm512_mul_ps(_mm512_cvtepi32_ps(dots), _mm512_loadu_ps(&a.d[at * 16])), acc[m]);
      }
    }
    float tail[M] = {}, zeros[8];
    _mm256_storeu_ps(zeros, zero);
    if ((K / 32) % 2) {  // an odd last block: dequantized, fp32
      const int64_t b = K / 32 - 1;
      vf w0, w1;
      block<KIND>(r, b, w0, w1);
      for (int m = 0; m < M; m++) tail[m] = sum16(w0 * loadf(x + m * K + 32 * b) + w1 * loadf(x + m * K + 32 * b + 16));
    }
    for (int m = 0; m < M; m++) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]) + zeros[m] + tail[m];
  }
}
#else
struct Int8Rows {};
#endif

template <int KIND>
static void run(const float* x, const uint8_t* w, int64_t rb, float* y, int64_t ldy, int64_t M, int64_t K,
                int64_t n0, int64_t n1, const Int8Rows* a) {
#ifdef INT8_DOTS
  if (a && (KIND == Q4_0 || KIND == Q4_1)) {
    switch (M) {
      case 1: rows_int8<1, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;  case 2: rows_int8<2, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;
      case 3: rows_int8<3, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;  case 4: rows_int8<4, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;
      case 5: rows_int8<5, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;  case 6: rows_int8<6, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;
      case 7: rows_int8<7, KIND>(*a, x, w, rb, y, ldy, K, n0, n1); break;  default: rows_int8<8, KIND>(*a, x, w, rb, y, ldy, K, n0, n1);
    }
    return;
  }
#endif
  switch (M) {
    case 1: rows<1, KIND>(x, w, rb, y, ldy, K, n0, n1); break;  case 2: rows<2, KIND>(x, w, rb, y, ldy, K, n0, n1); break;
    case 3: rows<3, KIND>(x, w, rb, y, ldy, K, n0, n1); break;  case 4: rows<4, KIND>(x, w, rb, y, ldy, K, n0, n1); break;
    case 5: rows<5, KIND>(x, w, rb, y, ldy, K, n0, n1); break;  case 6: rows<6, KIND>(x, w, rb, y, ldy, K, n0, n1); break;
    case 7: rows<7, KIND>(x, w, rb, y, ldy, K, n0, n1); break;  default: rows<8, KIND>(x, w, rb, y, ldy, K, n0, n1);
  }
}

struct Mat { const uint8_t* w; int64_t rb, N; int kind; };  // a matrix's raw rows, bytes per row, rows, format

static Mat mat(const torch::Tensor& w, int64_t kind, int64_t N) {
  TORCH_CHECK(w.is_contiguous(), "kernels: weights must be contiguous");
  return {(const uint8_t*)w.data_ptr(), (int64_t)(w.numel() * w.element_size() / N), N, (int)kind};
}

// Y (M, ΣN) = X (M, K) times each matrix in turn, side by side: one parallel loop over all their rows.
static void matmul(const float* X, int64_t M, int64_t K, const std::vector<Mat>& mats, float* Y) {
  TORCH_CHECK(M >= 1 && M <= 8 && K % 32 == 0, "kernels: 1 to 8 rows of a multiple of 32 values");
  std::vector<int64_t> start = {0};
  for (const Mat& m : mats) start.push_back(start.back() + m.N);
  const int64_t total = start.back();
  Int8Rows int8;  // the activations as integers (rows_int8), when a Q4 matrix will use them
  bool q4 = false;
  for (const Mat& m : mats) q4 = q4 || m.kind == Q4_0 || m.kind == Q4_1;
#ifdef INT8_DOTS
  if (q4) int8 = int8_rows(X, M, K);
#endif
  const Int8Rows* a = q4 ? &int8 : nullptr;
  // at least 32 rows per task, so small matrices do not pay for waking the second thread
  at::parallel_for(0, total, 32, [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < mats.size(); i++) {
      const int64_t lo = std::max(n0, start[i]) - start[i], hi = std::min(n1, start[i + 1]) - start[i];
      if (lo >= hi) continue;
      const Mat& m = mats[i]; float* y = Y + start[i];
      switch (m.kind) {
        case F32: run<F32>(X, m.w, m.rb, y, total, M, K, lo, hi, a); break;
        case BF16: run<BF16>(X, m.w, m.rb, y, total, M, K, lo, hi, a); break;
        case Q8_0: run<Q8_0>(X, m.w, m.rb, y, total, M, K, lo, hi, a); break;
        case Q4_0: run<Q4_0>(X, m.w, m.rb, y, total, M, K, lo, hi, a); break;
        default: run<Q4_1>(X, m.w, m.rb, y, total, M, K, lo, hi, a);
      }
    }
  });
}

// x (M, K) fp32 with M <= 8 and K % 32 == 0; w (N, row bytes) the raw rows -> (M, N) fp32
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w, int64_t kind, int64_t N) {
  TORCH_CHECK(x.is_contiguous(), "linear_rows: x must be contiguous");
  auto y = torch::empty({x.size(0), N}, x.options());
  matmul(x.data_ptr<float>(), x.size(0), x.size(1), {mat(w, kind, N)}, y.data_ptr<float>());
  return y;
}

// ---- one decoder layer's decode step in two calls (perf/fast.py FastDecoderLayer; model/llama.py is the
// reference): attn_in (norm, q/k/v, rotary), then the cache write in Python, then layer_out = attn_out
// (attention, o_proj, residual) and mlp (norm, SwiGLU, residual). Rows m = one token of batch row m (T = 1).

// q·k over D values: 16 lanes at a time when D allows (a scalar sum is one chain of D dependent adds)
static inline float dot(const float* a, const float* b, int64_t D) {
  if (D % 16) { float s = 0; for (int64_t d = 0; d < D; d++) s += a[d] * b[d]; return s; }
  vf s = {};
  for (int64_t d = 0; d < D; d += 16) s += loadf(a + d) * loadf(b + d);
  return sum16(s);
}

// e^x for x <= 0, 16 lanes: 2^n · e^r with n = round(x / ln 2), |r| <= ln(2)/2, Taylor to r^6 (relative
// error < 2e-7, about an ulp); x below -87 (e^x < 1.7e-38) is taken as -87. A scalar std::exp per score
// cost more than the rest of the attention (measured: 1.8 of 2.6 ms a SmolLM2 step at 280 cached tokens).
static inline vf exp_neg(vf x) {
  const vf lowest = vf{} - 87.f;
  x = x < lowest ? lowest : x;
  const vf shifter = vf{} + 12582912.f;  // 1.5 · 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504f + shifter) - shifter;
  const vf r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln 2 in two parts: r stays exact
  const vf p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n as an fp32's exponent
  vf scale; std::memcpy(&scale, &bits, 64);
  return p * scale;
}

// out (D) = scale · Σ_j p[j] · v[j] over S rows of v (row stride `stride`), the sum kept in registers
static void weighted_sum(const float* p, float scale, const float* v, int64_t stride, int64_t S, int64_t D,
                         float* out) {
  if (D % 16 || D > 256) {
    for (int64_t d = 0; d < D; d++) out[d] = 0;
    for (int64_t j = 0; j < S; j++) for (int64_t d = 0; d < D; d++) out[d] += p[j] * v[j * stride + d];
  } else {
    vf acc[16] = {};  // D <= 256: 16 vectors of 16
    for (int64_t j = 0; j < S; j++) {
      if (p[j] == 0) continue;  // masked
      for (int64_t i = 0; i < D / 16; i++) acc[i] += p[j] * loadf(v + j * stride + 16 * i);
    }
    for (int64_t i = 0; i < D / 16; i++) std::memcpy(out + 16 * i, &acc[i], 64);
  }
  for (int64_t d = 0; d < D; d++) out[d] *= scale;
}

static void rms_norm(const float* x, const float* w, float eps, int64_t M, int64_t C, float* out) {
  for (int64_t m = 0; m < M; m++) {
    double ss = 0; for (int64_t c = 0; c < C; c++) ss += (double)x[m * C + c] * x[m * C + c];
    const float r = 1.f / std::sqrt((float)(ss / C) + eps);
    for (int64_t c = 0; c < C; c++) out[m * C + c] = w[c] * (x[m * C + c] * r);
  }
}

static std::vector<Mat> mats(const std::vector<torch::Tensor>& w, const std::vector<int64_t>& kind,
                             const std::vector<int64_t>& N) {
  std::vector<Mat> out;
  for (size_t i = 0; i < w.size(); i++) out.push_back(mat(w[i], kind[i], N[i]));
  return out;
}

// -> (M, Nq + 2 Nk): q, k, v of the normed x, biases added, q and k rotated (rotate-half pairs; cos/sin (M, D))
torch::Tensor attn_in(torch::Tensor x, torch::Tensor norm, double eps, std::vector<torch::Tensor> w,
                      std::vector<int64_t> kind, std::vector<int64_t> N, std::vector<torch::Tensor> bias,
                      torch::Tensor cos, torch::Tensor sin) {
  const int64_t M = x.size(0), C = x.size(1), D = cos.size(1), Nq = N[0], Nk = N[1], W = Nq + 2 * Nk;
  auto h = torch::empty_like(x);
  rms_norm(x.data_ptr<float>(), norm.data_ptr<float>(), (float)eps, M, C, h.data_ptr<float>());
  auto y = torch::empty({M, W}, x.options());
  float* Y = y.data_ptr<float>();
  matmul(h.data_ptr<float>(), M, C, mats(w, kind, N), Y);
  const int64_t offsets[3] = {0, Nq, Nq + Nk};
  for (int i = 0; i < 3; i++)
    if (bias[i].defined() && bias[i].numel())
      for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N[i]; n++) Y[m * W + offsets[i] + n] += bias[i].data_ptr<float>()[n];
  const float* cs = cos.data_ptr<float>(); const float* sn = sin.data_ptr<float>();
  for (int64_t m = 0; m < M; m++)
    for (int64_t head = 0; head < (Nq + Nk) / D; head++) {
      float* v = Y + m * W + head * D;
      for (int64_t i = 0; i < D / 2; i++) {
        const float a = v[i], b = v[i + D / 2];
        v[i] = a * cs[m * D + i] - b * sn[m * D + i];
        v[i + D / 2] = b * cs[m * D + i + D / 2] + a * sn[m * D + i + D / 2];
      }
    }
  return y;
}

// x + o_proj(softmax(q·kᵀ/sqrt(D) masked)·v): q (M, H·D) with M = B; k[b], v[b] (K, S_b, D) row b's keys and
// values, any strides (a KVCache's rows, or a paged cache's blocks, of different lengths); mask (B, S_m) bool
// (true = may attend) whose last S_b columns are row b's, or empty = all
torch::Tensor attn_out(torch::Tensor x, torch::Tensor q, std::vector<torch::Tensor> k, std::vector<torch::Tensor> v,
                       torch::Tensor mask, torch::Tensor wo, int64_t kind, int64_t H) {
  const int64_t B = (int64_t)k.size(), K = k[0].size(0), D = k[0].size(2), C = x.size(1), G = H / K;
  auto att = torch::empty({B, H * D}, x.options());
  const float* Q = q.data_ptr<float>();
  float* A = att.data_ptr<float>();
  const bool* mk = mask.defined() && mask.numel() ? mask.data_ptr<bool>() : nullptr;
  const int64_t Sm = mk ? mask.size(1) : 0;
  const float scale = 1.f / std::sqrt((float)D);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H, g = h / G, S = k[b].size(1);
      TORCH_CHECK(!mk || S <= Sm, "attn_out: a row has more keys than mask columns");
      const bool* row_mask = mk ? mk + b * Sm + (Sm - S) : nullptr;
      p.resize(S);
      const float* qv = Q + b * q.stride(0) + h * D;
      const float* kb = k[b].data_ptr<float>() + g * k[b].stride(0);
      const float* vb = v[b].data_ptr<float>() + g * v[b].stride(0);
      float peak = -INFINITY;
      for (int64_t j = 0; j < S; j++) {
        if (row_mask && !row_mask[j]) { p[j] = -INFINITY; continue; }
        p[j] = dot(qv, kb + j * k[b].stride(1), D) * scale; peak = std::max(peak, p[j]);
      }
      int64_t j = 0;
      for (; j + 16 <= S; j += 16) { const vf e = exp_neg(loadf(&p[j]) - peak); std::memcpy(&p[j], &e, 64); }
      for (; j < S; j++) p[j] = std::exp(p[j] - peak);
      if (row_mask) for (j = 0; j < S; j++) if (!row_mask[j]) p[j] = 0.f;  // masked: exactly 0, not e^-87
      float total = 0;
      for (j = 0; j < S; j++) total += p[j];
      float* out = A + b * H * D + h * D;
      weighted_sum(p.data(), 1.f / total, vb, v[b].stride(1), S, D, out);
    }
  });
  auto y = torch::empty({B, C}, x.options());
  matmul(A, B, H * D, {mat(wo, kind, C)}, y.data_ptr<float>());
  return y.add_(x);
}

// x + down(silu(gate(h)) · up(h)), h = rms_norm(x)
torch::Tensor mlp(torch::Tensor x, torch::Tensor norm, double eps, std::vector<torch::Tensor> w,
                  std::vector<int64_t> kind, std::vector<int64_t> N) {
  const int64_t M = x.size(0), C = x.size(1), F = N[0];
  auto h = torch::empty_like(x);
  rms_norm(x.data_ptr<float>(), norm.data_ptr<float>(), (float)eps, M, C, h.data_ptr<float>());
  auto gu = torch::empty({M, 2 * F}, x.options());
  float* GU = gu.data_ptr<float>();
  matmul(h.data_ptr<float>(), M, C, {mat(w[0], kind[0], F), mat(w[1], kind[1], F)}, GU);
  auto a = torch::empty({M, F}, x.options());
  float* Ap = a.data_ptr<float>();
  for (int64_t m = 0; m < M; m++) {
    const float* g = GU + m * 2 * F; const float* u = g + F;
    int64_t f = 0;
    for (; f + 16 <= F; f += 16) {  // silu(g) = g·σ(g), σ from e^-|g| (exp_neg): a scalar exp each was 6% of a batch-8 step
      const vf x = loadf(g + f), one = vf{} + 1.f, e = exp_neg(x < 0 ? x : -x), sigmoid = (x < 0 ? e : one) / (one + e);
      const vf out = x * sigmoid * loadf(u + f);
      std::memcpy(Ap + m * F + f, &out, 64);
    }
    for (; f < F; f++) Ap[m * F + f] = g[f] / (1.f + std::exp(-g[f])) * u[f];
  }
  auto y = torch::empty({M, C}, x.options());
  matmul(Ap, M, F, {mat(w[2], kind[2], C)}, y.data_ptr<float>());
  return y.add_(x);
}

// whether Q4 weights meet int8 activations (this CPU has AVX512-VNNI), or fp32 ones
bool int8_dots() {
#ifdef INT8_DOTS
  return true;
#else
  return false;
#endif
}

// the rest of a decode step after the cache write: mlp(attn_out(...)), one call from Python instead of two
torch::Tensor layer_out(torch::Tensor x, torch::Tensor q, std::vector<torch::Tensor> k, std::vector<torch::Tensor> v,
                        torch::Tensor mask,
                        torch::Tensor wo, int64_t kind_o, int64_t H, torch::Tensor norm, double eps,
                        std::vector<torch::Tensor> w, std::vector<int64_t> kind, std::vector<int64_t> N) {
  return mlp(attn_out(x, q, k, v, mask, wo, kind_o, H), norm, eps, w, kind, N);
}

// A whole decode step of every layer in one call (perf/fast.py FastLlamaModel), for a KVCache: per layer
// attn_in, the new keys and values copied into its buffers at `slot`, layer_out over slots 0..slot. The
// Python around 30 layers' calls (~70 us a layer: module calls, the cache write, views) costs as much as
// their attention. Per layer l: tensors[12 l ...] = norm1, wq, wk, wv, bq, bk, bv (empty: none), wo, norm2,
// wgate, wup, wdown; kinds[7 l ...] their formats; eps[2 l ...]. x (B, C); k_bufs[l], v_bufs[l] (B, K, S_max, D).
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor mask,
                            std::vector<torch::Tensor> k_bufs, std::vector<torch::Tensor> v_bufs, int64_t slot,
                            std::vector<torch::Tensor> tensors, std::vector<int64_t> kinds, std::vector<double> eps,
                            int64_t H, int64_t F) {
  const int64_t B = x.size(0), C = x.size(1), K = k_bufs[0].size(1), D = k_bufs[0].size(3);
  const int64_t Nq = H * D, Nk = K * D, W = Nq + 2 * Nk;
  for (size_t l = 0; l < k_bufs.size(); l++) {
    const torch::Tensor* t = &tensors[12 * l];
    const int64_t* kd = &kinds[7 * l];
    auto qkv = attn_in(x, t[0], eps[2 * l], {t[1], t[2], t[3]}, {kd[0], kd[1], kd[2]}, {Nq, Nk, Nk},
                       {t[4], t[5], t[6]}, cos, sin);  // (B, W): q, k, v
    torch::Tensor& kb = k_bufs[l]; torch::Tensor& vb = v_bufs[l];
    TORCH_CHECK(kb.is_contiguous() && vb.is_contiguous() && slot < kb.size(2), "decode_layers: cache buffers");
    std::vector<torch::Tensor> ks, vs;
    for (int64_t b = 0; b < B; b++) {
      for (int64_t g = 0; g < K; g++) {
        const float* row = qkv.data_ptr<float>() + b * W;
        std::memcpy(kb.data_ptr<float>() + ((b * K + g) * kb.size(2) + slot) * D, row + Nq + g * D, D * 4);
        std::memcpy(vb.data_ptr<float>() + ((b * K + g) * vb.size(2) + slot) * D, row + Nq + Nk + g * D, D * 4);
      }
      ks.push_back(kb.select(0, b).narrow(1, 0, slot + 1));  // (K, slot + 1, D)
      vs.push_back(vb.select(0, b).narrow(1, 0, slot + 1));
    }
    x = layer_out(x, qkv, ks, vs, mask, t[7], kd[3], H, t[8], eps[2 * l + 1], {t[9], t[10], t[11]},
                  {kd[4], kd[5], kd[6]}, {F, F, C});  // q read from qkv's first H·D columns
  }
  return x;
}
