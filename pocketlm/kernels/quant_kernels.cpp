// pocketlm's CPU kernels for quantized inference: a blocked int4/int8 linear with activations
// quantized per 32-block to int8 (decoding) or int16 (the output head, long inputs), a whole Llama
// decoder layer for one new token per row. The math each function computes is defined by the pure-PyTorch versions in
// fallback.py; this file only makes it fast. Instruction sets are chosen at compile time from the
// predefined macros (the build passes -march=native), so dispatch happens once, at build time.
//
// Batch invariance: every output element is produced by one thread with a fixed sequence of
// operations (fixed SIMD lane layout, fixed horizontal sums, attention chunks of a fixed size merged
// in order), so a row's result never depends on the batch size, its neighbours or the thread count.
// The build passes -ffp-contract=off so the compiler cannot fuse a*b+c differently in different
// instantiations of the same code.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PL_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PL_AVX2 1
#include <immintrin.h>
#endif

#if defined(_MSC_VER)
#define PL_INLINE __forceinline
#else
#define PL_INLINE inline __attribute__((always_inline))
#endif

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t ATTN_CHUNK = 64;  // key positions per attention work item (fixed: invariance)

const char* kernel_path() {
#if defined(PL_AVX512)
  return "avx512-vnni";
#elif defined(PL_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// ---------------------------------------------------------------------------------------------
// Weights and activations

struct QWeight {
  const uint8_t* q;       // row o starts at q + o * row_bytes
  const at::Half* scale;  // (out, nb)
  const at::Half* offset; // (out, nb) or nullptr (int8)
  int64_t out, in, nb, row_bytes;
  bool int4;
};

QWeight view_weight(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                    const char* what) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous(), what, ": q must be a contiguous 2-D tensor");
  TORCH_CHECK(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte, what,
              ": q must be int8 (8-bit blocks) or uint8 (4-bit blocks), got ", q.scalar_type());
  QWeight w;
  w.int4 = q.scalar_type() == at::kByte;
  w.out = q.size(0);
  w.row_bytes = q.size(1);
  w.in = w.int4 ? 2 * q.size(1) : q.size(1);
  TORCH_CHECK(w.in % BLOCK == 0, what, ": in_features ", w.in, " is not a multiple of 32");
  w.nb = w.in / BLOCK;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == w.out && scale.size(1) == w.nb,
              what, ": scale must be contiguous float16 (", w.out, ", ", w.nb, ")");
  w.q = reinterpret_cast<const uint8_t*>(q.data_ptr());
  w.scale = scale.data_ptr<at::Half>();
  w.offset = nullptr;
  if (w.int4) {
    TORCH_CHECK(offset.has_value() && offset->defined(), what, ": 4-bit blocks need an offset");
    TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->is_contiguous() && offset->sizes() == scale.sizes(),
                what, ": offset must be contiguous float16 shaped like scale");
    w.offset = offset->data_ptr<at::Half>();
  } else {
    TORCH_CHECK(!(offset.has_value() && offset->defined()), what, ": 8-bit blocks take no offset");
  }
  return w;
}

// Activations quantized per row per block, to int8 (Q = int8_t, top 127) or int16 (int16_t, top
// 32767): q = nearbyint(x · top / amax), sx = amax / top. int16 blocks are stored in pair order
// (pair_pos; see the int16 products below).
template <typename Q>
struct QActs {
  static constexpr float top = sizeof(Q) == 1 ? 127.f : 32767.f;
  int64_t M = 0, nb = 0;
  std::vector<Q> q;           // (M, nb · 32)
  std::vector<float> sx;      // (M, nb)
  std::vector<float> sxs;     // (M, nb): sx · Σ q, for the 4-bit offset term
  std::vector<int32_t> qsum;  // (M, nb): Σ q, to undo the +128 bias of 8-bit weights (int8)
};
using Acts8 = QActs<int8_t>;
using Acts16 = QActs<int16_t>;

// Where activation i of a block goes in the int16 pair order.
inline int64_t pair_pos(int64_t i) { return (i & ~3) + ((i & 1) << 1) + ((i >> 1) & 1); }

// One block of 32 activations → int8 q (natural order) or int16 q (pair order), its amax and Σ q.
// The vector path computes exactly what the scalar one does: the same amax, the same single
// rounding of x · (top / amax), rounded half to even (the default MXCSR mode, as nearbyint).
template <typename Q>
inline void quantize_block(const float* xb, float top, Q* qb, float& amax_out, int& sum_out) {
#if defined(PL_AVX512)
  const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  const __m512 inv = _mm512_set1_ps(amax == 0.f ? 0.f : top / amax);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
  sum_out = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  amax_out = amax;
  if constexpr (sizeof(Q) == 1) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(q1));
  } else {
    alignas(64) int32_t v[32];
    _mm512_store_si512(v, q0);
    _mm512_store_si512(v + 16, q1);
    for (int64_t i = 0; i < BLOCK; ++i) qb[pair_pos(i)] = static_cast<Q>(v[i]);
  }
#else
  float amax = 0.f;
  for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float inv = amax == 0.f ? 0.f : top / amax;
  int sum = 0;
  for (int64_t i = 0; i < BLOCK; ++i) {
    const int v = static_cast<int>(std::nearbyint(xb[i] * inv));  // round half to even
    qb[sizeof(Q) == 1 ? i : pair_pos(i)] = static_cast<Q>(v);
    sum += v;
  }
  amax_out = amax;
  sum_out = sum;
#endif
}

template <typename Q>
void quantize_activations(const float* x, int64_t M, int64_t in, QActs<Q>& a) {
  a.M = M;
  a.nb = in / BLOCK;
  a.q.resize(M * a.nb * BLOCK);
  a.sx.resize(M * a.nb);
  a.sxs.resize(M * a.nb);
  a.qsum.resize(M * a.nb);
  at::parallel_for(0, M, 1, [&](int64_t m_begin, int64_t m_end) {  // rows apart: the same bits either way
    for (int64_t m = m_begin; m < m_end; ++m)
      for (int64_t b = 0; b < a.nb; ++b) {
        const int64_t at = m * a.nb + b;
        float amax;
        int sum;
        quantize_block(x + m * in + b * BLOCK, QActs<Q>::top, a.q.data() + at * BLOCK, amax, sum);
        a.sx[at] = amax / QActs<Q>::top;
        a.sxs[at] = a.sx[at] * static_cast<float>(sum);
        a.qsum[at] = sum;
      }
  });
}

// ---------------------------------------------------------------------------------------------
// The blocked product. Output rows are taken OUT_TILE at a time, one per SIMD lane: block b of
// the tile's weight rows is loaded and transposed in registers so that lane r holds 4 weights of
// row r, and each activation row then needs only 8 integer dot-product steps per block (4 of its
// int8 values broadcast to every lane), one conversion and one multiply-add per block, instead of
// a horizontal sum per output. Up to ROW_TILE activation rows share each transposed block.
//
// Per output, the float arithmetic is one accumulator updated block by block in order:
//   acc = fma(float(Σ_i w_i·x_i), scale_b · sx_b, acc)       then, for 4-bit blocks,
//   acc = fma(offset_b, sx_b · Σ_i x_i, acc)
// the same whatever the batch, the tile or the thread, so rows are batch-invariant.

constexpr int64_t ROW_TILE = 8;  // activation rows sharing one transposed weight block
constexpr int64_t AHEAD_TILES = 1;  // how far ahead weights are prefetched

// One tile of OUT_TILE output rows as the product kernels read it.
struct Tile {
  const at::Half* scales;  // per block: the tile's OUT_TILE scales, then (4-bit) its OUT_TILE offsets
  int64_t nb;
  // bytes of a later tile to request from memory while this one is multiplied, spread over its
  // blocks (decoding streams every weight once: the loads then overlap the arithmetic)
  const char* ahead = nullptr;
  int64_t ahead_per_block = 0;
  const char* ahead_scales = nullptr;
  int64_t ahead_scales_per_block = 0;
};

inline void prefetch_ahead(const Tile& ts, int64_t b) {
#if defined(PL_AVX512) || defined(PL_AVX2)
  const char* p = ts.ahead + b * ts.ahead_per_block;
  for (int64_t at = 0; at < ts.ahead_per_block; at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
  p = ts.ahead_scales + b * ts.ahead_scales_per_block;
  for (int64_t at = 0; at < ts.ahead_scales_per_block; at += 64) _mm_prefetch(p + at, _MM_HINT_T0);
#else
  (void)ts, (void)b;
#endif
}

inline int32_t load_u32(const void* p) {  // 4 activation bytes (or 2 int16) as one broadcastable word
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(PL_AVX512)

constexpr int64_t OUT_TILE = 16;

// Lane r of out[j] = bytes 4j..4j+3 of the 16 bytes at rows[r] + at (r < 16).
PL_INLINE void transpose_16(const uint8_t* const* rows, int64_t at, __m512i out[4]) {
  __m512i t[4];
  for (int r = 0; r < 4; ++r) {  // t[r]'s 128-bit lane k holds row r + 4k
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + at)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r + 4] + at)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r + 8] + at)), 2);
    t[r] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r + 12] + at)), 3);
  }
  const __m512i a0 = _mm512_unpacklo_epi32(t[0], t[1]), a1 = _mm512_unpackhi_epi32(t[0], t[1]);
  const __m512i a2 = _mm512_unpacklo_epi32(t[2], t[3]), a3 = _mm512_unpackhi_epi32(t[2], t[3]);
  out[0] = _mm512_unpacklo_epi64(a0, a2);
  out[1] = _mm512_unpackhi_epi64(a0, a2);
  out[2] = _mm512_unpacklo_epi64(a1, a3);
  out[3] = _mm512_unpackhi_epi64(a1, a3);
}

// Block b of the tile's rows: wv[j] lane r holds weights 4j .. 4j + 3 of row r (a 4-bit byte i holds
// weight i in its low nibble and weight i + 16 in its high one; 8-bit weights as stored, signed).
template <bool INT4>
PL_INLINE void block_weights(const uint8_t* const* rows, int64_t b, __m512i wv[8]) {
  if (INT4) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    transpose_16(rows, b * 16, wv);
    for (int j = 0; j < 4; ++j) {
      wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(wv[j], 4), low);
      wv[j] = _mm512_and_si512(wv[j], low);
    }
  } else {
    transpose_16(rows, b * BLOCK, wv);
    transpose_16(rows, b * BLOCK + 16, wv + 4);
  }
}

// Block b's scales (s) and, for 4-bit blocks, offsets (f) of the tile's rows, one per lane.
template <bool INT4>
PL_INLINE void block_scales(const Tile& ts, int64_t b, __m512& s, __m512& f) {
  const at::Half* sb = ts.scales + b * (INT4 ? 2 : 1) * OUT_TILE;
  s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
  f = INT4 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + OUT_TILE))) : _mm512_setzero_ps();
}

// acc[r] (one lane per output row of the tile) for activation rows m0 .. m0 + R - 1.
template <int R, bool INT4>
void tile_rows(const uint8_t* const* rows, const Tile& ts, const Acts8& a, int64_t m0, __m512* acc) {
  const int64_t nb = ts.nb;
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    if (ts.ahead) prefetch_ahead(ts, b);
    // wv[j] pairs with activations 4j .. 4j + 3 of the block; 8-bit weights get +128 so that they
    // are the unsigned operand of vpdpbusd (undone below with 128 · Σ x)
    __m512i wv[8];
    block_weights<INT4>(rows, b, wv);
    if (!INT4)
      for (int j = 0; j < 8; ++j) wv[j] = _mm512_xor_si512(wv[j], flip);
    __m512 s, f;
    block_scales<INT4>(ts, b, s, f);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int8_t* x = a.q.data() + at * BLOCK;
      // two independent chains of 4 steps (integer sums: exact in any order)
      __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], _mm512_set1_epi32(load_u32(x)));
      __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], _mm512_set1_epi32(load_u32(x + 4)));
      for (int j = 2; j < 8; j += 2) {
        even = _mm512_dpbusd_epi32(even, wv[j], _mm512_set1_epi32(load_u32(x + 4 * j)));
        odd = _mm512_dpbusd_epi32(odd, wv[j + 1], _mm512_set1_epi32(load_u32(x + 4 * j + 4)));
      }
      __m512i isum = _mm512_add_epi32(even, odd);
      if (!INT4) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * a.qsum[at]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(s, _mm512_set1_ps(a.sx[at])), acc[r]);
      if (INT4) acc[r] = _mm512_fmadd_ps(f, _mm512_set1_ps(a.sxs[at]), acc[r]);
    }
  }
}

template <int R>
void store_rows(const __m512* acc, int64_t lanes, const float* bias, float* y, int64_t stride) {
  const __mmask16 mk = static_cast<__mmask16>((1u << lanes) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * stride, mk, bias ? _mm512_add_ps(acc[r], bv) : acc[r]);
}

using Acc = __m512;

#elif defined(PL_AVX2)

constexpr int64_t OUT_TILE = 8;

inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Lane r of out[j] = bytes 4j..4j+3 of the 16 bytes at rows[r] + at (r < 8).
PL_INLINE void transpose_8(const uint8_t* const* rows, int64_t at, __m256i out[4]) {
  __m256i t[4];
  for (int r = 0; r < 4; ++r)  // t[r]'s 128-bit lane k holds row r + 4k
    t[r] = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + at))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r + 4] + at)), 1);
  const __m256i a0 = _mm256_unpacklo_epi32(t[0], t[1]), a1 = _mm256_unpackhi_epi32(t[0], t[1]);
  const __m256i a2 = _mm256_unpacklo_epi32(t[2], t[3]), a3 = _mm256_unpackhi_epi32(t[2], t[3]);
  out[0] = _mm256_unpacklo_epi64(a0, a2);
  out[1] = _mm256_unpackhi_epi64(a0, a2);
  out[2] = _mm256_unpacklo_epi64(a1, a3);
  out[3] = _mm256_unpackhi_epi64(a1, a3);
}

template <bool INT4>
PL_INLINE void block_weights(const uint8_t* const* rows, int64_t b, __m256i wv[8]) {
  if (INT4) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    transpose_8(rows, b * 16, wv);
    for (int j = 0; j < 4; ++j) {
      wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(wv[j], 4), low);
      wv[j] = _mm256_and_si256(wv[j], low);
    }
  } else {
    transpose_8(rows, b * BLOCK, wv);
    transpose_8(rows, b * BLOCK + 16, wv + 4);
  }
}

template <bool INT4>
PL_INLINE void block_scales(const Tile& ts, int64_t b, __m256& s, __m256& f) {
  const at::Half* sb = ts.scales + b * (INT4 ? 2 : 1) * OUT_TILE;
  s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb)));
  f = INT4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + OUT_TILE))) : _mm256_setzero_ps();
}

template <int R, bool INT4>
void tile_rows(const uint8_t* const* rows, const Tile& ts, const Acts8& a, int64_t m0, __m256* acc) {
  const int64_t nb = ts.nb;
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    if (ts.ahead) prefetch_ahead(ts, b);
    // vpmaddubsw multiplies unsigned by signed bytes: 4-bit weights are unsigned already; 8-bit
    // ones go in as |w| with their sign moved onto x. Pairs fit int16 (2·15·127, 2·128·127).
    __m256i wv[8], sign[8];
    block_weights<INT4>(rows, b, INT4 ? wv : sign);
    if (!INT4)
      for (int j = 0; j < 8; ++j) wv[j] = _mm256_sign_epi8(sign[j], sign[j]);
    __m256 s, f;
    block_scales<INT4>(ts, b, s, f);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int8_t* x = a.q.data() + at * BLOCK;
      __m256i isum = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        __m256i xv = _mm256_set1_epi32(load_u32(x + 4 * j));
        if (!INT4) xv = _mm256_sign_epi8(xv, sign[j]);
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[j], xv), ones));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(s, _mm256_set1_ps(a.sx[at])), acc[r]);
      if (INT4) acc[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(a.sxs[at]), acc[r]);
    }
  }
}

template <int R>
void store_rows(const __m256* acc, int64_t lanes, const float* bias, float* y, int64_t stride) {
  for (int r = 0; r < R; ++r) {
    alignas(32) float v[OUT_TILE];
    _mm256_store_ps(v, acc[r]);
    for (int64_t l = 0; l < lanes; ++l) y[r * stride + l] = bias ? v[l] + bias[l] : v[l];
  }
}

using Acc = __m256;

#else

constexpr int64_t OUT_TILE = 1;

struct Acc {
  float v;
};

template <int R, bool INT4>
void tile_rows(const uint8_t* const* rows, const Tile& ts, const Acts8& a, int64_t m0, Acc* acc) {
  const int64_t nb = ts.nb;
  const uint8_t* wq = rows[0];
  for (int r = 0; r < R; ++r) acc[r].v = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int8_t* x = a.q.data() + at * BLOCK;
      int isum = 0;
      if (INT4) {
        for (int i = 0; i < 16; ++i) isum += (wq[b * 16 + i] & 15) * x[i] + (wq[b * 16 + i] >> 4) * x[16 + i];
      } else {
        const int8_t* wb = reinterpret_cast<const int8_t*>(wq) + b * BLOCK;
        for (int i = 0; i < BLOCK; ++i) isum += wb[i] * x[i];
      }
      const at::Half* sb = ts.scales + b * (INT4 ? 2 : 1);
      acc[r].v = std::fma(static_cast<float>(isum), static_cast<float>(sb[0]) * a.sx[at], acc[r].v);
      if (INT4) acc[r].v = std::fma(static_cast<float>(sb[1]), a.sxs[at], acc[r].v);
    }
  }
}

template <int R>
void store_rows(const Acc* acc, int64_t, const float* bias, float* y, int64_t stride) {
  for (int r = 0; r < R; ++r) y[r * stride] = bias ? acc[r].v + bias[0] : acc[r].v;
}

#endif

struct Int8Rows {
  const Acts8& a;
  template <int R, bool INT4>
  void run(const uint8_t* const* rows, const Tile& ts, int64_t m0, Acc* acc) const {
    tile_rows<R, INT4>(rows, ts, a, m0, acc);
  }
};

// `count` activation rows from m0 (1 .. ROW_TILE) of one tile through kernel.run<R, INT4>, stored
template <bool INT4, class Kernel>
void tile_product(const Kernel& kernel, const uint8_t* const* rows, const Tile& ts, int64_t m0, int64_t count,
                  int64_t lanes, const float* bias, float* y, int64_t stride) {
  Acc acc[ROW_TILE];
#define PL_TILE_CASE(R)                                      \
  case R:                                                    \
    kernel.template run<R, INT4>(rows, ts, m0, acc);         \
    store_rows<R>(acc, lanes, bias, y, stride);              \
    break;
  switch (count) {
    PL_TILE_CASE(1) PL_TILE_CASE(2) PL_TILE_CASE(3) PL_TILE_CASE(4)
    PL_TILE_CASE(5) PL_TILE_CASE(6) PL_TILE_CASE(7)
    default: PL_TILE_CASE(8)
  }
#undef PL_TILE_CASE
}

// The scales (and 4-bit offsets) regrouped for the product: (tiles, nb, P) float16, where tile t's
// block b holds the scales of rows t·OUT_TILE .. t·OUT_TILE + OUT_TILE - 1 (0 past the last row),
// then, for 4-bit blocks, their offsets: P = OUT_TILE or 2 · OUT_TILE. One load per block per
// tile instead of OUT_TILE strided reads. Made once per weight (QuantizedLinear keeps it).
at::Tensor tile_scales(const at::Tensor& scale, const std::optional<at::Tensor>& offset) {
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.is_contiguous(),
              "tile_scales: scale must be contiguous float16 (out, blocks)");
  const bool int4 = offset.has_value() && offset->defined();
  if (int4)
    TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->is_contiguous() && offset->sizes() == scale.sizes(),
                "tile_scales: offset must be contiguous float16 shaped like scale");
  const int64_t out = scale.size(0), nb = scale.size(1), tiles = (out + OUT_TILE - 1) / OUT_TILE;
  const int64_t P = (int4 ? 2 : 1) * OUT_TILE;
  at::Tensor tiled = at::zeros({tiles, nb, P}, scale.options());
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* op = int4 ? offset->data_ptr<at::Half>() : nullptr;
  at::Half* dst = tiled.data_ptr<at::Half>();
  for (int64_t o = 0; o < out; ++o) {
    at::Half* tile = dst + (o / OUT_TILE) * nb * P + o % OUT_TILE;
    for (int64_t b = 0; b < nb; ++b) {
      tile[b * P] = sp[o * nb + b];
      if (int4) tile[b * P + OUT_TILE] = op[o * nb + b];
    }
  }
  return tiled;
}

// The tiled scales of w: `tiles` checked, or made now into `made` when the caller has none.
const at::Half* tiles_ptr(const std::optional<at::Tensor>& tiles, const at::Tensor& scale,
                          const std::optional<at::Tensor>& offset, const QWeight& w, at::Tensor& made, const char* what) {
  const int64_t n_tiles = (w.out + OUT_TILE - 1) / OUT_TILE, P = (w.int4 ? 2 : 1) * OUT_TILE;
  if (!tiles.has_value() || !tiles->defined()) {
    made = tile_scales(scale, offset);
    return made.data_ptr<at::Half>();
  }
  TORCH_CHECK(tiles->scalar_type() == at::kHalf && tiles->is_contiguous() && tiles->dim() == 3 &&
                  tiles->size(0) == n_tiles && tiles->size(1) == w.nb && tiles->size(2) == P,
              what, ": tiles must be contiguous float16 (", n_tiles, ", ", w.nb, ", ", P, ") from tile_scales");
  return tiles->data_ptr<at::Half>();
}

// y (M, out) = the blocked product of M quantized activation rows (kernel) with weight w (+ bias).
// Threads split the output tiles; each thread streams its slice of the weight once per ROW_TILE rows.
template <class Kernel>
void product_into(const Kernel& kernel, int64_t M, const QWeight& w, const at::Half* tiled, const float* bias,
                  float* y) {
  const int64_t out = w.out, nb = w.nb, tiles = (out + OUT_TILE - 1) / OUT_TILE;
  const int64_t P = (w.int4 ? 2 : 1) * OUT_TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> zeros;  // stands in for the missing rows of a last, partial tile
    const uint8_t* rows[OUT_TILE];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * OUT_TILE, lanes = std::min(OUT_TILE, out - o0);
      if (lanes < OUT_TILE && zeros.empty()) zeros.assign(w.row_bytes, 0);
      for (int64_t r = 0; r < OUT_TILE; ++r) rows[r] = r < lanes ? w.q + (o0 + r) * w.row_bytes : zeros.data();
      Tile ts{tiled + t * nb * P, nb};
      if (t + AHEAD_TILES < t1) {  // (the first rows only: later ones find the tile in cache)
        const int64_t first = (t + AHEAD_TILES) * OUT_TILE, count = std::min(OUT_TILE, out - first);
        ts.ahead = reinterpret_cast<const char*>(w.q + first * w.row_bytes);
        ts.ahead_per_block = (count * w.row_bytes + nb * 64 - 1) / (nb * 64) * 64;
        ts.ahead_scales = reinterpret_cast<const char*>(tiled + (t + AHEAD_TILES) * nb * P);
        ts.ahead_scales_per_block = (P * 2 + 63) / 64 * 64;
      }
      for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
        const int64_t count = std::min(ROW_TILE, M - m0);
        const float* b0 = bias ? bias + o0 : nullptr;
        if (m0 > 0) ts.ahead = ts.ahead_scales = nullptr, ts.ahead_per_block = ts.ahead_scales_per_block = 0;
        if (w.int4) tile_product<true>(kernel, rows, ts, m0, count, lanes, b0, y + m0 * out + o0, out);
        else tile_product<false>(kernel, rows, ts, m0, count, lanes, b0, y + m0 * out + o0, out);
      }
    }
  });
}

void linear_raw(const float* x, int64_t M, const QWeight& w, const at::Half* tiled, const float* bias, float* y,
                Acts8& scratch) {
  quantize_activations(x, M, w.in, scratch);
  product_into(Int8Rows{scratch}, M, w, tiled, bias, y);
}

void check_rows(const at::Tensor& x, int64_t width, const char* what) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), what,
              " must be a contiguous float32 (rows, features) tensor");
  TORCH_CHECK(x.size(1) == width, what, " has ", x.size(1), " features, the weight takes ", width);
}

const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t out) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
              "bias must be a contiguous float32 tensor of ", out, " values");
  return bias->data_ptr<float>();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                  const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& tiles) {
  const QWeight w = view_weight(q, scale, offset, "linear");
  check_rows(x, w.in, "linear: x");
  at::Tensor y = at::empty({x.size(0), w.out}, x.options());
  Acts8 scratch;
  at::Tensor made;
  const at::Half* tp = tiles_ptr(tiles, scale, offset, w, made, "linear");
  linear_raw(x.data_ptr<float>(), x.size(0), w, tp, bias_ptr(bias, w.out), y.data_ptr<float>(), scratch);
  return y;
}

// ---------------------------------------------------------------------------------------------
// The same products with activations quantized to int16 per block (step amax / 32767, 258 times
// finer than int8): for the output head, whose logits feed every token's choice, and for long
// inputs (a prefill), whose keys and values every later token reads. int8 steps are coarse in a
// block that holds one of a model's outlier features and visibly shift such a model's answers;
// int16 steps are not, and the integer products stay exact (32 · 128 · 32767 < 2^31).
//
// Each block's int16 activations are stored in pairs, the order the weight lanes come in:
// x0 x2 x1 x3 | x4 x6 x5 x7 | ...: word 2j pairs with weights 4j and 4j + 2, word 2j + 1 with
// 4j + 1 and 4j + 3 (one vpdpwssd / vpmaddwd step each). Per output, as for int8:
//   acc = fma(float(Σ w·x), scale_b · sx_b, acc)      then, for 4-bit blocks,
//   acc = fma(offset_b, sx_b · Σ x, acc)

#if defined(PL_AVX512)

template <int R, bool INT4>
void tile_rows16(const uint8_t* const* rows, const Tile& ts, const Acts16& a, int64_t m0, __m512* acc) {
  const int64_t nb = ts.nb;
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low_bytes = _mm512_set1_epi16(0x00FF);
  for (int64_t b = 0; b < nb; ++b) {
    if (ts.ahead) prefetch_ahead(ts, b);
    __m512i wv[8];
    block_weights<INT4>(rows, b, wv);
    __m512i even[8], odd[8];  // int16 pairs: (w 4j, w 4j+2) and (w 4j+1, w 4j+3) in each lane
    for (int j = 0; j < 8; ++j) {
      even[j] = INT4 ? _mm512_and_si512(wv[j], low_bytes) : _mm512_srai_epi16(_mm512_slli_epi16(wv[j], 8), 8);
      odd[j] = INT4 ? _mm512_srli_epi16(wv[j], 8) : _mm512_srai_epi16(wv[j], 8);
    }
    __m512 s, f;
    block_scales<INT4>(ts, b, s, f);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int16_t* x = a.q.data() + at * BLOCK;
      __m512i e = _mm512_dpwssd_epi32(_mm512_setzero_si512(), even[0], _mm512_set1_epi32(load_u32(x)));
      __m512i o = _mm512_dpwssd_epi32(_mm512_setzero_si512(), odd[0], _mm512_set1_epi32(load_u32(x + 2)));
      for (int j = 1; j < 8; ++j) {
        e = _mm512_dpwssd_epi32(e, even[j], _mm512_set1_epi32(load_u32(x + 4 * j)));
        o = _mm512_dpwssd_epi32(o, odd[j], _mm512_set1_epi32(load_u32(x + 4 * j + 2)));
      }
      const __m512i isum = _mm512_add_epi32(e, o);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(s, _mm512_set1_ps(a.sx[at])), acc[r]);
      if (INT4) acc[r] = _mm512_fmadd_ps(f, _mm512_set1_ps(a.sxs[at]), acc[r]);
    }
  }
}

#elif defined(PL_AVX2)

template <int R, bool INT4>
void tile_rows16(const uint8_t* const* rows, const Tile& ts, const Acts16& a, int64_t m0, __m256* acc) {
  const int64_t nb = ts.nb;
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low_bytes = _mm256_set1_epi16(0x00FF);
  for (int64_t b = 0; b < nb; ++b) {
    if (ts.ahead) prefetch_ahead(ts, b);
    __m256i wv[8];
    block_weights<INT4>(rows, b, wv);
    __m256i even[8], odd[8];
    for (int j = 0; j < 8; ++j) {
      even[j] = INT4 ? _mm256_and_si256(wv[j], low_bytes) : _mm256_srai_epi16(_mm256_slli_epi16(wv[j], 8), 8);
      odd[j] = INT4 ? _mm256_srli_epi16(wv[j], 8) : _mm256_srai_epi16(wv[j], 8);
    }
    __m256 s, f;
    block_scales<INT4>(ts, b, s, f);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int16_t* x = a.q.data() + at * BLOCK;
      __m256i isum = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(even[j], _mm256_set1_epi32(load_u32(x + 4 * j))));
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(odd[j], _mm256_set1_epi32(load_u32(x + 4 * j + 2))));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(s, _mm256_set1_ps(a.sx[at])), acc[r]);
      if (INT4) acc[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(a.sxs[at]), acc[r]);
    }
  }
}

#else

template <int R, bool INT4>
void tile_rows16(const uint8_t* const* rows, const Tile& ts, const Acts16& a, int64_t m0, Acc* acc) {
  const int64_t nb = ts.nb;
  const uint8_t* wq = rows[0];
  for (int r = 0; r < R; ++r) acc[r].v = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const at::Half* sb = ts.scales + b * (INT4 ? 2 : 1);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * nb + b;
      const int16_t* x = a.q.data() + at * BLOCK;
      int64_t isum = 0;
      for (int64_t i = 0; i < BLOCK; ++i) {
        const int v = INT4 ? (i < 16 ? wq[b * 16 + i] & 15 : wq[b * 16 + i - 16] >> 4)
                           : reinterpret_cast<const int8_t*>(wq)[b * BLOCK + i];
        isum += v * x[pair_pos(i)];
      }
      acc[r].v = std::fma(static_cast<float>(isum), static_cast<float>(sb[0]) * a.sx[at], acc[r].v);
      if (INT4) acc[r].v = std::fma(static_cast<float>(sb[1]), a.sxs[at], acc[r].v);
    }
  }
}

#endif

struct Int16Rows {
  const Acts16& a;
  template <int R, bool INT4>
  void run(const uint8_t* const* rows, const Tile& ts, int64_t m0, Acc* acc) const {
    tile_rows16<R, INT4>(rows, ts, a, m0, acc);
  }
};

at::Tensor linear16(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& tiles) {
  const QWeight w = view_weight(q, scale, offset, "linear16");
  check_rows(x, w.in, "linear16: x");
  at::Tensor made;
  const at::Half* tp = tiles_ptr(tiles, scale, offset, w, made, "linear16");
  at::Tensor y = at::empty({x.size(0), w.out}, x.options());
  Acts16 a;
  quantize_activations(x.data_ptr<float>(), x.size(0), w.in, a);
  product_into(Int16Rows{a}, a.M, w, tp, bias_ptr(bias, w.out), y.data_ptr<float>());
  return y;
}


// ---------------------------------------------------------------------------------------------
// Small vector helpers for the decoder layer (fixed reduction order in each)

#if defined(PL_AVX512)
// exp for x ≤ 88.7: 2^n · e^r with |r| ≤ ln2/2 and a degree-7 Taylor polynomial (< 1 ulp of
// float32 error from truncation); inputs below −87.3 (including −inf for masked keys) give 0.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}
#endif

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float tail = 0.f;
#if defined(PL_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  tail = _mm512_reduce_add_ps(acc);
#elif defined(PL_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  tail = hsum256(acc);
#endif
  for (; i < n; ++i) tail += a[i] * b[i];
  return tail;
}

// o += p · v
inline void axpy(float p, const float* v, float* o, int64_t n) {
  int64_t i = 0;
#if defined(PL_AVX512)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(o + i)));
#elif defined(PL_AVX2)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
#endif
  for (; i < n; ++i) o[i] += p * v[i];
}

// s[i] = exp(s[i] − shift); returns Σ s[i] in a fixed order
inline float exp_shifted(float* s, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.f;
#if defined(PL_AVX512)
  __m512 acc = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), sh));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    total += s[i];
  }
  return total;
}

// g[i] = silu(g[i]) · u[i]
inline void swiglu(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if defined(PL_AVX512)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

inline void to_f32(const at::Half* src, float* dst, int64_t n);

// A cache row as float32: a float32 row is read in place, a float16 one converted into buf.
inline const float* as_f32(const float* src, float*, int64_t) { return src; }
inline const float* as_f32(const at::Half* src, float* buf, int64_t n) {
  to_f32(src, buf, n);
  return buf;
}
inline void to_f32(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(PL_AVX512) || defined(PL_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void rms_norm(const float* x, const float* weight, float eps, int64_t B, int64_t C, float* h) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * C;
    const float r = 1.f / std::sqrt(dot_f32(xr, xr, C) / static_cast<float>(C) + eps);
    for (int64_t i = 0; i < C; ++i) h[b * C + i] = xr[i] * r * weight[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Attention over the cache for one new query per row, flash-decoding style: work items are
// (row, kv head, chunk of ATTN_CHUNK positions); each gives, for the G query heads of its group, the
// chunk's max score, Σ exp and Σ exp · v; the chunks are then merged in order.

struct Cache {
  void* data;
  bool half;
  int64_t s_b, s_k, s_t;  // strides in elements of batch, kv head, position
};

Cache view_cache(const at::Tensor& c, int64_t K, int64_t D, const char* what) {
  TORCH_CHECK(c.dim() == 4 && c.size(1) == K && c.size(3) == D && c.stride(3) == 1, what,
              " must be (rows, n_kv_head, S_max, head_dim) with contiguous rows");
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kHalf, what, " must be float32 or float16");
  return {c.data_ptr(), c.scalar_type() == at::kHalf, c.stride(0), c.stride(1), c.stride(2)};
}

template <typename T>
const T* cache_row(const Cache& c, int64_t b, int64_t k, int64_t t) {
  return static_cast<const T*>(c.data) + b * c.s_b + k * c.s_k + t * c.s_t;
}

template <typename T>
void attend_chunk(const float* q, const Cache& kc, const Cache& vc, const bool* mask, int64_t b, int64_t kh,
                  int64_t t0, int64_t len, int64_t G, int64_t D, float scale, float* m_out, float* l_out,
                  float* o_out, std::vector<float>& scores, std::vector<float>& row) {
  scores.resize(G * len);
  row.resize(D);
  for (int64_t j = 0; j < len; ++j) {
    if (mask && !mask[t0 + j]) {
      for (int64_t g = 0; g < G; ++g) scores[g * len + j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float* key = as_f32(cache_row<T>(kc, b, kh, t0 + j), row.data(), D);
    for (int64_t g = 0; g < G; ++g) scores[g * len + j] = dot_f32(q + g * D, key, D) * scale;
  }
  std::fill(o_out, o_out + G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * len;
    const float mx = *std::max_element(s, s + len);
    m_out[g] = mx;
    l_out[g] = mx == -std::numeric_limits<float>::infinity() ? 0.f : exp_shifted(s, len, mx);
  }
  for (int64_t j = 0; j < len; ++j) {
    if (mask && !mask[t0 + j]) continue;
    const float* value = as_f32(cache_row<T>(vc, b, kh, t0 + j), row.data(), D);
    for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + j], value, o_out + g * D, D);
  }
}

#if defined(PL_AVX512)
// attend_chunk for head_dim 16·DV with the key, the G queries' accumulators and the values in
// registers: each cache row is loaded (and a float16 one converted) once, straight into vectors,
// and the outputs are stored once per chunk. The same operations in the same order as the
// generic version, so the same bits.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

constexpr int64_t ATTN_MAX_GROUP = 8;  // query heads per key/value head handled in registers

template <typename T, int DV>
void attend_chunk_regs(const float* q, const Cache& kc, const Cache& vc, const bool* mask, int64_t b, int64_t kh,
                       int64_t t0, int64_t len, int64_t G, float scale, float* m_out, float* l_out, float* o_out,
                       std::vector<float>& scores) {
  constexpr int64_t D = DV * 16;
  scores.resize(G * len);
  for (int64_t j = 0; j < len; ++j) {
    if (mask && !mask[t0 + j]) {
      for (int64_t g = 0; g < G; ++g) scores[g * len + j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const T* key = cache_row<T>(kc, b, kh, t0 + j);
    __m512 k[DV];
    for (int d = 0; d < DV; ++d) k[d] = load16(key + 16 * d);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int d = 0; d < DV; ++d) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * d), k[d], acc);
      scores[g * len + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * len;
    const float mx = *std::max_element(s, s + len);
    m_out[g] = mx;
    l_out[g] = mx == -std::numeric_limits<float>::infinity() ? 0.f : exp_shifted(s, len, mx);
  }
  __m512 o[ATTN_MAX_GROUP][DV];
  for (int64_t g = 0; g < G; ++g)
    for (int d = 0; d < DV; ++d) o[g][d] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    if (mask && !mask[t0 + j]) continue;
    const T* value = cache_row<T>(vc, b, kh, t0 + j);
    __m512 v[DV];
    for (int d = 0; d < DV; ++d) v[d] = load16(value + 16 * d);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * len + j]);
      for (int d = 0; d < DV; ++d) o[g][d] = _mm512_fmadd_ps(p, v[d], o[g][d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int d = 0; d < DV; ++d) _mm512_storeu_ps(o_out + g * D + 16 * d, o[g][d]);
}
#endif

// One work item of attention: the register version where it applies, else the generic one.
template <typename T>
void attend(const float* q, const Cache& kc, const Cache& vc, const bool* mask, int64_t b, int64_t kh, int64_t t0,
            int64_t len, int64_t G, int64_t D, float scale, float* m_out, float* l_out, float* o_out,
            std::vector<float>& scores, std::vector<float>& row) {
#if defined(PL_AVX512)
  if (G <= ATTN_MAX_GROUP && D == 64)
    return attend_chunk_regs<T, 4>(q, kc, vc, mask, b, kh, t0, len, G, scale, m_out, l_out, o_out, scores);
  if (G <= ATTN_MAX_GROUP && D == 128)
    return attend_chunk_regs<T, 8>(q, kc, vc, mask, b, kh, t0, len, G, scale, m_out, l_out, o_out, scores);
#endif
  attend_chunk<T>(q, kc, vc, mask, b, kh, t0, len, G, D, scale, m_out, l_out, o_out, scores, row);
}

template <typename T>
void write_cache_row(const Cache& c, int64_t b, int64_t k, int64_t t, const float* src, int64_t D) {
  T* dst = static_cast<T*>(c.data) + b * c.s_b + k * c.s_k + t * c.s_t;
  for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(src[i]);
}

// Row b's query attends to positions 0..pos[b] of cache row crow[b], in chunks counted from
// position 0 of that row: the same reductions whatever the batch or where the row sits in it.
void attention(const float* qkv, const Cache& kc, const Cache& vc, const bool* mask, int64_t mask_stride,
               int64_t B, int64_t H, int64_t K, int64_t D, const std::vector<int64_t>& pos,
               const std::vector<int64_t>& crow, float* out) {
  const int64_t G = H / K, width = (H + 2 * K) * D;
  const int64_t chunks = (*std::max_element(pos.begin(), pos.end()) + ATTN_CHUNK) / ATTN_CHUNK, items = B * K * chunks;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<float> mx(items * G, -std::numeric_limits<float>::infinity()), l(items * G, 0.f), o(items * G * D);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, row;  // scratch, reused by this thread's items
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % chunks, kh = (i / chunks) % K, b = i / (chunks * K), S = pos[b] + 1;
      const int64_t t0 = c * ATTN_CHUNK;
      if (t0 >= S) continue;  // past this row's end: an empty chunk (l = 0)
      const float* q = qkv + b * width + kh * G * D;  // the group's G query heads are adjacent
      const bool* m = mask ? mask + b * mask_stride : nullptr;
      const int64_t len = std::min(ATTN_CHUNK, S - t0);
      if (kc.half)
        attend<at::Half>(q, kc, vc, m, crow[b], kh, t0, len, G, D, scale, &mx[i * G], &l[i * G], &o[i * G * D],
                         scores, row);
      else
        attend<float>(q, kc, vc, m, crow[b], kh, t0, len, G, D, scale, &mx[i * G], &l[i * G], &o[i * G * D],
                      scores, row);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = pos[b] / ATTN_CHUNK + 1;  // this row's chunks
    for (int64_t kh = 0; kh < K; ++kh) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = (b * K + kh) * chunks;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < used; ++c) top = std::max(top, mx[(first + c) * G + g]);
        float* dst = out + b * H * D + (kh * G + g) * D;
        std::fill(dst, dst + D, 0.f);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // every key masked: zeros
        float total = 0.f;
        for (int64_t c = 0; c < used; ++c) {
          const int64_t it = first + c;
          if (l[it * G + g] == 0.f) continue;
          const float w = std::exp(mx[it * G + g] - top);
          total += w * l[it * G + g];
          axpy(w, &o[(it * G + g) * D], dst, D);
        }
        const float inv = 1.f / total;
        for (int64_t i = 0; i < D; ++i) dst[i] *= inv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One decoder layer for one new token per row (see fallback.decode_layer for the math)

// (q, scale, offset, tiles): tiles from tile_scales, or None to make them for this call
using QW = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>;

struct LayerWeight {
  QWeight w;
  at::Tensor made;
  const at::Half* tiles;
  LayerWeight(const QW& t, const char* what) : w(view_weight(std::get<0>(t), std::get<1>(t), std::get<2>(t), what)) {
    tiles = tiles_ptr(std::get<3>(t), std::get<1>(t), std::get<2>(t), w, made, what);
  }
};

at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& norm1, const QW& qkv_w, const QW& o_w,
                        const at::Tensor& norm2, const QW& gate_up_w, const QW& down_w, double eps,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t n, int64_t n_head, int64_t n_kv_head, const std::optional<at::Tensor>& key_mask,
                        const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "decode_layer: x must be float32 (B, C)");
  const int64_t B = x_in.size(0), C = x_in.size(1), H = n_head, K = n_kv_head;
  TORCH_CHECK(H > 0 && K > 0 && H % K == 0, "decode_layer: n_head must be a multiple of n_kv_head");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.size(0) == B && cos.is_contiguous() && sin.is_contiguous() && sin.sizes() == cos.sizes(),
              "decode_layer: cos and sin must be contiguous float32 (B, head_dim)");
  const int64_t D = cos.size(1);
  TORCH_CHECK(D % 2 == 0, "decode_layer: head_dim must be even");
  for (const at::Tensor* norm : {&norm1, &norm2})
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == C,
                "decode_layer: norm weights must be contiguous float32 (C,)");
  const LayerWeight lqkv(qkv_w, "decode_layer qkv"), lo(o_w, "decode_layer o"),
      lgu(gate_up_w, "decode_layer gate_up"), ld(down_w, "decode_layer down");
  const QWeight &wqkv = lqkv.w, &wo = lo.w, &wgu = lgu.w, &wd = ld.w;
  const int64_t width = (H + 2 * K) * D, I = wgu.out / 2;
  TORCH_CHECK(wqkv.in == C && wqkv.out == width, "decode_layer: qkv weight must be (", width, ", ", C, ")");
  TORCH_CHECK(wo.in == H * D && wo.out == C, "decode_layer: o weight must be (", C, ", ", H * D, ")");
  TORCH_CHECK(wgu.in == C && wgu.out % 2 == 0, "decode_layer: gate_up weight must be (2 · I, ", C, ")");
  TORCH_CHECK(wd.in == I && wd.out == C, "decode_layer: down weight must be (", C, ", ", I, ")");
  const Cache kc = view_cache(k_cache, K, D, "decode_layer: k_cache");
  const Cache vc = view_cache(v_cache, K, D, "decode_layer: v_cache");
  TORCH_CHECK(kc.half == vc.half && k_cache.sizes() == v_cache.sizes(),
              "decode_layer: k_cache and v_cache must have the same dtype and shape");
  // each row's position (where its key and value go, and how far it attends) and cache row:
  // n and 0..B-1 unless `lengths` / `rows` (int64 (B,)) say otherwise
  std::vector<int64_t> pos(B, n), crow(B);
  for (int64_t b = 0; b < B; ++b) crow[b] = b;
  for (const auto& [given, dst, what] : {std::make_tuple(&lengths, &pos, "lengths"), std::make_tuple(&rows, &crow, "rows")}) {
    if (!given->has_value() || !(*given)->defined()) continue;
    const at::Tensor& t = **given;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == B, "decode_layer: ", what,
                " must be int64 (B,)");
    const at::Tensor c = t.contiguous();
    std::copy(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + B, dst->begin());
  }
  const int64_t S_max = k_cache.size(2);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(crow[b] >= 0 && crow[b] < k_cache.size(0), "decode_layer: cache row ", crow[b], " of batch row ", b,
                " is not among the cache's ", k_cache.size(0), " rows");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S_max, "decode_layer: the cache holds ", S_max, " positions, position ",
                pos[b], " does not fit");
  }
  const bool* mask = nullptr;
  int64_t mask_stride = 0;
  if (key_mask.has_value() && key_mask->defined()) {
    const int64_t top = *std::max_element(pos.begin(), pos.end());
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == B &&
                    key_mask->size(1) > top && key_mask->stride(1) == 1,
                "decode_layer: key_mask must be bool (B, S) with S > every position");
    mask = key_mask->data_ptr<bool>();
    mask_stride = key_mask->stride(0);
  }

  at::Tensor x = x_in.contiguous().clone();
  float* xp = x.data_ptr<float>();
  std::vector<float> h(B * C), t(B * width), attn(B * H * D), proj(B * C), gu(B * 2 * I), act(B * I), rot(D);
  Acts8 scratch;

  rms_norm(xp, norm1.data_ptr<float>(), static_cast<float>(eps), B, C, h.data());
  linear_raw(h.data(), B, wqkv, lqkv.tiles, nullptr, t.data(), scratch);
  // RoPE on the H query and K key heads: out[j] = t[j]·cos[j] + t[(j + D/2) % D]·sin[j]
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t head = 0; head < H + K; ++head) {
      float* v = t.data() + b * width + head * D;
      for (int64_t j = 0; j < D; ++j) rot[j] = v[j] * cp[b * D + j] + v[(j + D / 2) % D] * sp[b * D + j];
      std::copy(rot.begin(), rot.end(), v);
    }
    for (int64_t kh = 0; kh < K; ++kh) {
      const float* k = t.data() + b * width + (H + kh) * D;
      const float* val = t.data() + b * width + (H + K + kh) * D;
      if (kc.half)
        write_cache_row<at::Half>(kc, crow[b], kh, pos[b], k, D), write_cache_row<at::Half>(vc, crow[b], kh, pos[b], val, D);
      else
        write_cache_row<float>(kc, crow[b], kh, pos[b], k, D), write_cache_row<float>(vc, crow[b], kh, pos[b], val, D);
    }
  }
  attention(t.data(), kc, vc, mask, mask_stride, B, H, K, D, pos, crow, attn.data());
  linear_raw(attn.data(), B, wo, lo.tiles, nullptr, proj.data(), scratch);
  for (int64_t i = 0; i < B * C; ++i) xp[i] += proj[i];

  rms_norm(xp, norm2.data_ptr<float>(), static_cast<float>(eps), B, C, h.data());
  linear_raw(h.data(), B, wgu, lgu.tiles, nullptr, gu.data(), scratch);
  for (int64_t b = 0; b < B; ++b) {
    float* g = gu.data() + b * 2 * I;
    swiglu(g, g + I, I);
    std::copy(g, g + I, act.data() + b * I);
  }
  linear_raw(act.data(), B, wd, ld.tiles, nullptr, proj.data(), scratch);
  for (int64_t i = 0; i < B * C; ++i) xp[i] += proj[i];
  return x;
}

// How many threads the kernels' at::parallel_for really runs on (1 when the build lacked OpenMP).
int64_t parallel_threads() {
  std::vector<char> seen(at::get_num_threads() + 1, 0);
  at::parallel_for(0, 1 << 12, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(seen.size())) seen[id] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pocketlm CPU kernels for int4/int8 blocked weights";
  m.attr("path") = kernel_path();
  // the kernels run without the GIL: a server's other Python threads go on meanwhile
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "blocked quantized linear", nogil, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("offset") = py::none(), py::arg("bias") = py::none(), py::arg("tiles") = py::none());
  m.def("tile_scales", &tile_scales, "scales (and offsets) regrouped by output tile for linear", nogil,
        py::arg("scale"), py::arg("offset") = py::none());
  m.def("linear16", &linear16, "blocked quantized linear, activations quantized to int16 per block", nogil,
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("offset") = py::none(), py::arg("bias") = py::none(),
        py::arg("tiles") = py::none());
  m.def("decode_layer", &decode_layer, "one decoder layer for one new token per row", nogil, py::arg("x"), py::arg("norm1"),
        py::arg("qkv"), py::arg("o"), py::arg("norm2"), py::arg("gate_up"), py::arg("down"), py::arg("eps"),
        py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("n"), py::arg("n_head"),
        py::arg("n_kv_head"), py::arg("key_mask") = py::none(), py::arg("lengths") = py::none(),
        py::arg("rows") = py::none());
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses in this build");
}
