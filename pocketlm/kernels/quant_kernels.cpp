// pocketlm's CPU kernels for quantized inference: a blocked int4/int8 linear with activations
// quantized to int8 per 32-block, a whole Llama decoder layer for one new token per row, and a
// threaded dequantize. The math each function computes is defined by the pure-PyTorch versions in
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

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t ROW_TILE = 4;     // activation rows sharing one unpacked weight block
constexpr int64_t ATTN_CHUNK = 256; // key positions per attention work item (fixed: invariance)
constexpr int64_t GROUP = 16;       // blocks whose scales are loaded together (AVX-512 lanes)
constexpr int64_t PREFETCH_ROWS = 8; // weight rows requested ahead of the one being multiplied

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

// Activations quantized per row per block: q = nearbyint(x · 127 / amax), sx = amax / 127.
// Rows are padded to whole groups of 16 blocks with zeros so that kernels may read a full group.
struct QActs {
  int64_t M = 0, nb = 0, nb_pad = 0;
  std::vector<int8_t> q;    // (M, nb_pad · 32), in the kernel's layout (see quantize_activations)
  std::vector<float> sx;    // (M, nb_pad)
  std::vector<float> sxs;   // (M, nb_pad): sx · Σ q, for the offset term
  const int8_t* row(int64_t m) const { return q.data() + m * nb_pad * BLOCK; }
};

// Position of element i of block b inside a row of quantized activations. The AVX-512 4-bit kernel
// unpacks two blocks' low nibbles into one 256-bit half and their high nibbles into the other, so
// the activations of each pair of blocks are stored in that same order: [b0 0..15 | b1 0..15 |
// b0 16..31 | b1 16..31]. Every other kernel reads blocks in their natural order.
inline int64_t act_pos(int64_t b, int64_t i, bool int4) {
#if defined(PL_AVX512)
  if (int4) return (b >> 1) * 64 + (i >> 4) * 32 + (b & 1) * 16 + (i & 15);
#endif
  (void)int4;
  return b * BLOCK + i;
}

void quantize_activations(const float* x, int64_t M, int64_t in, bool int4, QActs& a) {
  a.M = M;
  a.nb = in / BLOCK;
  a.nb_pad = (a.nb + GROUP - 1) / GROUP * GROUP;
  a.q.assign(M * a.nb_pad * BLOCK, 0);
  a.sx.assign(M * a.nb_pad, 0.f);
  a.sxs.assign(M * a.nb_pad, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* qrow = a.q.data() + m * a.nb_pad * BLOCK;
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* xb = x + m * in + b * BLOCK;
      float amax = 0.f;
      for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float inv = amax == 0.f ? 0.f : 127.f / amax;
      int sum = 0;
      for (int64_t i = 0; i < BLOCK; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));  // round half to even
        qrow[act_pos(b, i, int4)] = static_cast<int8_t>(v);
        sum += v;
      }
      a.sx[m * a.nb_pad + b] = amax / 127.f;
      a.sxs[m * a.nb_pad + b] = a.sx[m * a.nb_pad + b] * static_cast<float>(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dot products of one weight row with R activation rows. Each row's arithmetic is the same
// whatever R is: R only decides how many rows share one unpacked weight block.

#if defined(PL_AVX512)

template <int R, bool INT4>
void dot_rows(const QWeight& w, int64_t o, const QActs& a, int64_t m0, float* dots) {
  const uint8_t* wq = w.q + o * w.row_bytes;
  const at::Half* ws = w.scale + o * w.nb;
  const at::Half* wo = INT4 ? w.offset + o * w.nb : nullptr;
  __m512 acc[R], acco[R];
  for (int r = 0; r < R; ++r) acc[r] = acco[r] = _mm512_setzero_ps();
  // lane → block of the pair: int4 lanes hold [b0 lo, b1 lo, b0 hi, b1 hi] in groups of 4 lanes,
  // int8 lanes hold [b0, b1] in groups of 8
  const __m512i pattern = INT4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                               : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g = 0; g < w.nb; g += GROUP) {
    const int nbg = static_cast<int>(std::min<int64_t>(GROUP, w.nb - g));
    const __mmask16 mk = static_cast<__mmask16>((1u << nbg) - 1);
    const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, ws + g));
    __m512 d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_mul_ps(sc, _mm512_loadu_ps(a.sx.data() + (m0 + r) * a.nb_pad + g));
    if (INT4) {
      const __m512 of = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, wo + g));
      for (int r = 0; r < R; ++r)
        acco[r] = _mm512_fmadd_ps(of, _mm512_loadu_ps(a.sxs.data() + (m0 + r) * a.nb_pad + g), acco[r]);
    }
    for (int p = 0; 2 * p < nbg; ++p) {
      const int64_t b = g + 2 * p;
      const bool pair = 2 * p + 1 < nbg;  // a lone last block reads zeros for its partner
      __m512i wv;
      __mmask64 negative = 0;
      if (INT4) {
        const __m256i raw = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * 16))
                                 : _mm256_maskz_loadu_epi8(0xFFFFu, wq + b * 16);
        const __m256i lo = _mm256_and_si256(raw, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
        wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      } else {
        const __m512i raw = pair ? _mm512_loadu_si512(wq + b * 32) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wq + b * 32);
        // vpdpbusd multiplies unsigned by signed bytes: use |w| and move w's sign onto x
        wv = _mm512_abs_epi8(raw);
        negative = _mm512_movepi8_mask(raw);
      }
      const __m512i idx = _mm512_add_epi32(pattern, _mm512_set1_epi32(2 * p));
      for (int r = 0; r < R; ++r) {
        __m512i xq = _mm512_loadu_si512(a.row(m0 + r) + b * BLOCK);
        if (!INT4) xq = _mm512_mask_sub_epi8(xq, negative, zero, xq);
        const __m512i isum = _mm512_dpbusd_epi32(zero, wv, xq);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_permutexvar_ps(idx, d[r]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(acco[r]);
}

#elif defined(PL_AVX2)

inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int R, bool INT4>
void dot_rows(const QWeight& w, int64_t o, const QActs& a, int64_t m0, float* dots) {
  const uint8_t* wq = w.q + o * w.row_bytes;
  const at::Half* ws = w.scale + o * w.nb;
  const at::Half* wo = INT4 ? w.offset + o * w.nb : nullptr;
  __m256 acc[R];
  float acco[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), acco[r] = 0.f;
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < w.nb; ++b) {
    __m256i wv, sign;
    if (INT4) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + b * 16));
      wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble), _mm_and_si128(raw, nibble));
    } else {
      // maddubs multiplies unsigned by signed bytes: use |w| and move w's sign onto x
      sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * 32));
      wv = _mm256_sign_epi8(sign, sign);
    }
    const float sc = static_cast<float>(ws[b]);
    for (int r = 0; r < R; ++r) {
      __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.row(m0 + r) + b * BLOCK));
      if (!INT4) xq = _mm256_sign_epi8(xq, sign);
      // pairs of products fit int16: 2 · 15 · 127 (int4) and 2 · 128 · 127 (int8)
      const __m256i isum = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xq), ones);
      const float d = sc * a.sx[(m0 + r) * a.nb_pad + b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc[r]);
      if (INT4) acco[r] += static_cast<float>(wo[b]) * a.sxs[(m0 + r) * a.nb_pad + b];
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = hsum256(acc[r]) + acco[r];
}

#else

template <int R, bool INT4>
void dot_rows(const QWeight& w, int64_t o, const QActs& a, int64_t m0, float* dots) {
  const uint8_t* wq = w.q + o * w.row_bytes;
  for (int r = 0; r < R; ++r) {
    const int8_t* x = a.row(m0 + r);
    float acc = 0.f, acco = 0.f;
    for (int64_t b = 0; b < w.nb; ++b) {
      int isum = 0;
      if (INT4) {
        for (int i = 0; i < 16; ++i) {
          isum += (wq[b * 16 + i] & 15) * x[b * BLOCK + i];
          isum += (wq[b * 16 + i] >> 4) * x[b * BLOCK + 16 + i];
        }
      } else {
        const int8_t* wb = reinterpret_cast<const int8_t*>(wq) + b * BLOCK;
        for (int i = 0; i < BLOCK; ++i) isum += wb[i] * x[b * BLOCK + i];
      }
      const float sx = a.sx[(m0 + r) * a.nb_pad + b];
      acc += static_cast<float>(w.scale[o * w.nb + b]) * sx * static_cast<float>(isum);
      if (INT4) acco += static_cast<float>(w.offset[o * w.nb + b]) * a.sxs[(m0 + r) * a.nb_pad + b];
    }
    dots[r] = acc + acco;
  }
}

#endif

template <bool INT4>
void dot_tile(const QWeight& w, int64_t o, const QActs& a, int64_t m0, int64_t rows, float* dots) {
  switch (rows) {
    case 1: dot_rows<1, INT4>(w, o, a, m0, dots); break;
    case 2: dot_rows<2, INT4>(w, o, a, m0, dots); break;
    case 3: dot_rows<3, INT4>(w, o, a, m0, dots); break;
    default: dot_rows<4, INT4>(w, o, a, m0, dots); break;
  }
}

// y (M, out) = the blocked product of quantized activations a with weight w (+ bias).
// Threads split the output rows; each thread streams its slice of the weight once for all M rows.
void linear_into(const QActs& a, const QWeight& w, const float* bias, float* y) {
  const int64_t M = a.M, out = w.out;
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    float dots[ROW_TILE];
    for (int64_t o = o0; o < o1; ++o) {
#if defined(PL_AVX512) || defined(PL_AVX2)
      // decoding streams every weight from memory once: ask for a row a few rows ahead, so the
      // loads overlap the arithmetic instead of waiting on each cache miss in turn
      if (o + PREFETCH_ROWS < o1) {
        const char* ahead = reinterpret_cast<const char*>(w.q + (o + PREFETCH_ROWS) * w.row_bytes);
        for (int64_t at = 0; at < w.row_bytes; at += 64) _mm_prefetch(ahead + at, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w.scale + (o + PREFETCH_ROWS) * w.nb), _MM_HINT_T0);
        if (w.offset) _mm_prefetch(reinterpret_cast<const char*>(w.offset + (o + PREFETCH_ROWS) * w.nb), _MM_HINT_T0);
      }
#endif
      for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
        const int64_t rows = std::min(ROW_TILE, M - m0);
        if (w.int4) dot_tile<true>(w, o, a, m0, rows, dots);
        else dot_tile<false>(w, o, a, m0, rows, dots);
        for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * out + o] = bias ? dots[r] + bias[o] : dots[r];
      }
    }
  });
}

void linear_raw(const float* x, int64_t M, const QWeight& w, const float* bias, float* y, QActs& scratch) {
  quantize_activations(x, M, w.in, w.int4, scratch);
  linear_into(scratch, w, bias, y);
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
                  const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias) {
  const QWeight w = view_weight(q, scale, offset, "linear");
  check_rows(x, w.in, "linear: x");
  at::Tensor y = at::empty({x.size(0), w.out}, x.options());
  QActs scratch;
  linear_raw(x.data_ptr<float>(), x.size(0), w, bias_ptr(bias, w.out), y.data_ptr<float>(), scratch);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Float activations times blocked weights, for the output head: its logits feed every token's
// choice, and quantizing its input to int8 would make them jump when one activation crosses a
// rounding step (a block holding one of the model's outlier features has coarse steps). Here
// the weights are dequantized block by block in registers and the activations stay float32, so
// the logits move smoothly with the hidden state. Per output, one accumulator walks the blocks in
// order, so each row's result is the same bits whatever the batch.

inline float dot_float_row(const QWeight& w, int64_t o, const float* x);

// Σ_b over one weight row o for R activation rows: scale_b · Σ q·x (+ offset_b · Σ x). Each
// block's weights are converted to float once and used for all R rows; every row's accumulator
// sees the same operations in the same order whatever R is.
template <int R>
inline void dot_float_rows(const QWeight& w, int64_t o, const float* x, int64_t stride, float* dots) {
  const uint8_t* row = w.q + o * w.row_bytes;
  const at::Half* sc = w.scale + o * w.nb;
  const at::Half* off = w.offset ? w.offset + o * w.nb : nullptr;
#if defined(PL_AVX512)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < w.nb; ++b) {
    __m512 w0, w1;
    if (w.int4) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
      w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low)));
      w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low)));
    } else {
      const int8_t* qb = reinterpret_cast<const int8_t*>(row) + b * BLOCK;
      w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb))));
      w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16))));
    }
    const __m512 s = _mm512_set1_ps(static_cast<float>(sc[b]));
    const __m512 f = _mm512_set1_ps(off ? static_cast<float>(off[b]) : 0.f);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * stride + b * BLOCK;
      const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
      const __m512 qx = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
      acc[r] = _mm512_fmadd_ps(qx, s, acc[r]);
      if (off) acc[r] = _mm512_fmadd_ps(_mm512_add_ps(x0, x1), f, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_ps(acc[r]);
#else
  for (int r = 0; r < R; ++r) dots[r] = dot_float_row(w, o, x + r * stride);
#endif
}

// one row at a time, for the paths without a blocked version
inline float dot_float_row(const QWeight& w, int64_t o, const float* x) {
  const uint8_t* row = w.q + o * w.row_bytes;
  const at::Half* sc = w.scale + o * w.nb;
  const at::Half* off = w.offset ? w.offset + o * w.nb : nullptr;
#if defined(PL_AVX512)
  float d;
  dot_float_rows<1>(w, o, x, 0, &d);
  return d;
#elif defined(PL_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.nb; ++b) {
    __m256 qx = _mm256_setzero_ps(), sx = _mm256_setzero_ps();
    for (int64_t k = 0; k < 4; ++k) {  // four groups of 8 weights: 0-7, 8-15 (low), 16-23, 24-31 (high)
      __m256 wk;
      if (w.int4) {
        const uint8_t* bytes = row + b * 16 + (k % 2) * 8;
        __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
        v = k < 2 ? _mm_and_si128(v, _mm_set1_epi8(0x0F)) : _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
        wk = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
      } else {
        const int8_t* qb = reinterpret_cast<const int8_t*>(row) + b * BLOCK + k * 8;
        wk = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb))));
      }
      const __m256 xk = _mm256_loadu_ps(x + b * BLOCK + k * 8);
      qx = _mm256_add_ps(qx, _mm256_mul_ps(wk, xk));
      sx = _mm256_add_ps(sx, xk);
    }
    acc = _mm256_add_ps(acc, _mm256_mul_ps(qx, _mm256_set1_ps(static_cast<float>(sc[b]))));
    if (off) acc = _mm256_add_ps(acc, _mm256_mul_ps(sx, _mm256_set1_ps(static_cast<float>(off[b]))));
  }
  return hsum256(acc);
#else
  float acc = 0.f;
  for (int64_t b = 0; b < w.nb; ++b) {
    float qx = 0.f, sx = 0.f;
    for (int64_t i = 0; i < BLOCK; ++i) {
      const int v = w.int4 ? (i < 16 ? row[b * 16 + i] & 0x0F : row[b * 16 + i - 16] >> 4)
                           : reinterpret_cast<const int8_t*>(row)[b * BLOCK + i];
      qx += static_cast<float>(v) * x[b * BLOCK + i];
      sx += x[b * BLOCK + i];
    }
    acc += qx * static_cast<float>(sc[b]);
    if (off) acc += sx * static_cast<float>(off[b]);
  }
  return acc;
#endif
}

at::Tensor linear_float(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                        const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias) {
  const QWeight w = view_weight(q, scale, offset, "linear_float");
  check_rows(x, w.in, "linear_float: x");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, w.out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias_ptr(bias, w.out);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.out, 64, [&](int64_t o0, int64_t o1) {
    float dots[ROW_TILE];
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
        const int64_t rows = std::min(ROW_TILE, M - m0);
        const float* xm = xp + m0 * w.in;
        switch (rows) {
          case 1: dot_float_rows<1>(w, o, xm, w.in, dots); break;
          case 2: dot_float_rows<2>(w, o, xm, w.in, dots); break;
          case 3: dot_float_rows<3>(w, o, xm, w.in, dots); break;
          default: dot_float_rows<4>(w, o, xm, w.in, dots); break;
        }
        for (int64_t r = 0; r < rows; ++r) yp[(m0 + r) * w.out + o] = bp ? dots[r] + bp[o] : dots[r];
      }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Dequantize: the weight (out, in) in float32, the same products as QuantizedLinear.dequantize

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& offset) {
  const QWeight w = view_weight(q, scale, offset, "dequantize");
  at::Tensor out = at::empty({w.out, w.in}, scale.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, w.out, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* wq = w.q + o * w.row_bytes;
      float* row = dst + o * w.in;
      for (int64_t b = 0; b < w.nb; ++b) {
        const float s = static_cast<float>(w.scale[o * w.nb + b]);
        if (w.int4) {
          const float m = static_cast<float>(w.offset[o * w.nb + b]);
          for (int i = 0; i < 16; ++i) {
            row[b * BLOCK + i] = static_cast<float>(wq[b * 16 + i] & 15) * s + m;
            row[b * BLOCK + 16 + i] = static_cast<float>(wq[b * 16 + i] >> 4) * s + m;
          }
        } else {
          const int8_t* wb = reinterpret_cast<const int8_t*>(wq) + b * BLOCK;
          for (int i = 0; i < BLOCK; ++i) row[b * BLOCK + i] = static_cast<float>(wb[i]) * s;
        }
      }
    }
  });
  return out;
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

inline void to_f32(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
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

Cache view_cache(const at::Tensor& c, int64_t B, int64_t K, int64_t D, int64_t n, const char* what) {
  TORCH_CHECK(c.dim() == 4 && c.size(0) == B && c.size(1) == K && c.size(3) == D && c.stride(3) == 1, what,
              " must be (B, n_kv_head, S_max, head_dim) with contiguous rows");
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kHalf, what, " must be float32 or float16");
  TORCH_CHECK(n >= 0 && n < c.size(2), what, " holds ", c.size(2), " positions, position ", n, " does not fit");
  return {c.data_ptr(), c.scalar_type() == at::kHalf, c.stride(0), c.stride(1), c.stride(2)};
}

template <typename T>
const T* cache_row(const Cache& c, int64_t b, int64_t k, int64_t t) {
  return static_cast<const T*>(c.data) + b * c.s_b + k * c.s_k + t * c.s_t;
}

template <typename T>
void attend_chunk(const float* q, const Cache& kc, const Cache& vc, const bool* mask, int64_t b, int64_t kh,
                  int64_t t0, int64_t len, int64_t G, int64_t D, float scale, float* m_out, float* l_out,
                  float* o_out) {
  std::vector<float> scores(G * len), row(D);
  for (int64_t j = 0; j < len; ++j) {
    if (mask && !mask[t0 + j]) {
      for (int64_t g = 0; g < G; ++g) scores[g * len + j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    to_f32(cache_row<T>(kc, b, kh, t0 + j), row.data(), D);
    for (int64_t g = 0; g < G; ++g) scores[g * len + j] = dot_f32(q + g * D, row.data(), D) * scale;
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
    to_f32(cache_row<T>(vc, b, kh, t0 + j), row.data(), D);
    for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + j], row.data(), o_out + g * D, D);
  }
}

template <typename T>
void write_cache_row(const Cache& c, int64_t b, int64_t k, int64_t t, const float* src, int64_t D) {
  T* dst = static_cast<T*>(c.data) + b * c.s_b + k * c.s_k + t * c.s_t;
  for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(src[i]);
}

void attention(const float* qkv, const Cache& kc, const Cache& vc, const bool* mask, int64_t mask_stride,
               int64_t B, int64_t H, int64_t K, int64_t D, int64_t n, float* out) {
  const int64_t G = H / K, width = (H + 2 * K) * D, S = n + 1;
  const int64_t chunks = (S + ATTN_CHUNK - 1) / ATTN_CHUNK, items = B * K * chunks;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  std::vector<float> mx(items * G), l(items * G), o(items * G * D);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % chunks, kh = (i / chunks) % K, b = i / (chunks * K);
      const float* q = qkv + b * width + kh * G * D;  // the group's G query heads are adjacent
      const bool* m = mask ? mask + b * mask_stride : nullptr;
      const int64_t t0 = c * ATTN_CHUNK, len = std::min(ATTN_CHUNK, S - t0);
      if (kc.half)
        attend_chunk<at::Half>(q, kc, vc, m, b, kh, t0, len, G, D, scale, &mx[i * G], &l[i * G], &o[i * G * D]);
      else
        attend_chunk<float>(q, kc, vc, m, b, kh, t0, len, G, D, scale, &mx[i * G], &l[i * G], &o[i * G * D]);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t kh = 0; kh < K; ++kh) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = (b * K + kh) * chunks;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks; ++c) top = std::max(top, mx[(first + c) * G + g]);
        float* dst = out + b * H * D + (kh * G + g) * D;
        std::fill(dst, dst + D, 0.f);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // every key masked: zeros
        float total = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
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

using QW = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>>;

QWeight view(const QW& w, const char* what) { return view_weight(std::get<0>(w), std::get<1>(w), std::get<2>(w), what); }

at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& norm1, const QW& qkv_w, const QW& o_w,
                        const at::Tensor& norm2, const QW& gate_up_w, const QW& down_w, double eps,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        int64_t n, int64_t n_head, int64_t n_kv_head, const std::optional<at::Tensor>& key_mask) {
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
  const QWeight wqkv = view(qkv_w, "decode_layer qkv"), wo = view(o_w, "decode_layer o"),
                wgu = view(gate_up_w, "decode_layer gate_up"), wd = view(down_w, "decode_layer down");
  const int64_t width = (H + 2 * K) * D, I = wgu.out / 2;
  TORCH_CHECK(wqkv.in == C && wqkv.out == width, "decode_layer: qkv weight must be (", width, ", ", C, ")");
  TORCH_CHECK(wo.in == H * D && wo.out == C, "decode_layer: o weight must be (", C, ", ", H * D, ")");
  TORCH_CHECK(wgu.in == C && wgu.out % 2 == 0, "decode_layer: gate_up weight must be (2 · I, ", C, ")");
  TORCH_CHECK(wd.in == I && wd.out == C, "decode_layer: down weight must be (", C, ", ", I, ")");
  const Cache kc = view_cache(k_cache, B, K, D, n, "decode_layer: k_cache");
  const Cache vc = view_cache(v_cache, B, K, D, n, "decode_layer: v_cache");
  TORCH_CHECK(kc.half == vc.half, "decode_layer: k_cache and v_cache must have the same dtype");
  const bool* mask = nullptr;
  int64_t mask_stride = 0;
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == B &&
                    key_mask->size(1) > n && key_mask->stride(1) == 1,
                "decode_layer: key_mask must be bool (B, S) with S > n");
    mask = key_mask->data_ptr<bool>();
    mask_stride = key_mask->stride(0);
  }

  at::Tensor x = x_in.contiguous().clone();
  float* xp = x.data_ptr<float>();
  std::vector<float> h(B * C), t(B * width), attn(B * H * D), proj(B * C), gu(B * 2 * I), act(B * I), rot(D);
  QActs scratch;

  rms_norm(xp, norm1.data_ptr<float>(), static_cast<float>(eps), B, C, h.data());
  linear_raw(h.data(), B, wqkv, nullptr, t.data(), scratch);
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
      if (kc.half) write_cache_row<at::Half>(kc, b, kh, n, k, D), write_cache_row<at::Half>(vc, b, kh, n, val, D);
      else write_cache_row<float>(kc, b, kh, n, k, D), write_cache_row<float>(vc, b, kh, n, val, D);
    }
  }
  attention(t.data(), kc, vc, mask, mask_stride, B, H, K, D, n, attn.data());
  linear_raw(attn.data(), B, wo, nullptr, proj.data(), scratch);
  for (int64_t i = 0; i < B * C; ++i) xp[i] += proj[i];

  rms_norm(xp, norm2.data_ptr<float>(), static_cast<float>(eps), B, C, h.data());
  linear_raw(h.data(), B, wgu, nullptr, gu.data(), scratch);
  for (int64_t b = 0; b < B; ++b) {
    float* g = gu.data() + b * 2 * I;
    swiglu(g, g + I, I);
    std::copy(g, g + I, act.data() + b * I);
  }
  linear_raw(act.data(), B, wd, nullptr, proj.data(), scratch);
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
  m.def("linear", &linear, "blocked quantized linear", py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("offset") = py::none(), py::arg("bias") = py::none());
  m.def("linear_float", &linear_float, "blocked weights times float32 activations (the output head)",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("offset") = py::none(), py::arg("bias") = py::none());
  m.def("dequantize", &dequantize, "weight (out, in) in float32", py::arg("q"), py::arg("scale"),
        py::arg("offset") = py::none());
  m.def("decode_layer", &decode_layer, "one decoder layer for one new token per row");
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses in this build");
}
