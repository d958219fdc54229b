// int4 / int8 weight x int8 activation GEMV with AVX2 (_mm256_maddubs_epi16: u8 x s8 pairs -> int16, then
// _mm256_madd_epi16 by ones -> int32 lanes of four products), for CPUs without AVX512-VNNI. Same activation
// layout and arithmetic as quant_avx512.cpp: unsigned nibbles u = s + 8 corrected once per output (int4),
// activation magnitudes times sign-carrying weights (int8, _mm256_sign_epi8). No pair sum can saturate int16:
// 2 * 15 * 127 and 2 * 127 * 127 are below 32767. A row's last partial chunk is copied into a zeroed buffer
// (AVX2 has no byte-masked loads).
#include <immintrin.h>

#include "kernels.h"

#define GLMTUNE_AVX2 __attribute__((target("avx2,fma")))
#define GLMTUNE_INLINE inline __attribute__((always_inline))

namespace glmtune {
namespace {

constexpr int kTile = 2;  // activation rows per pass over a chunk (16 ymm registers)

GLMTUNE_AVX2 GLMTUNE_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc += scale * (int32 lanes of u8 x s8 dot products + offset)
GLMTUNE_AVX2 GLMTUNE_INLINE __m256 dot_add(__m256 acc, __m256i u, __m256i s, __m256i offset, __m256 scale) {
  const __m256i lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lanes, offset)), scale, acc);
}

// One 128-value chunk of weight row w (its bytes from w on) against M activation rows from m0. A ymm register
// of products covers 4-value lanes 8h .. 8h + 7 of a 64-value half, whose blocks are lane % 4: the same
// [d0 d1 d2 d3] broadcast scales every register.
template <int M, bool Int4>
GLMTUNE_AVX2 GLMTUNE_INLINE void step(__m256 (&acc)[M], const int8_t* w, const Activations& act, int64_t m0,
                                      int64_t c) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i parts[4];  // int4: odd values of bytes 0-31, 32-63, then even ones; int8: the chunk's 4 x 32 bytes
  for (int h = 0; h < (Int4 ? 2 : 4); ++h) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + h * 32));
    if constexpr (Int4) {
      const __m256i flipped = _mm256_xor_si256(raw, _mm256_set1_epi8(static_cast<char>(0x88)));
      parts[h] = _mm256_and_si256(flipped, _mm256_set1_epi8(0x0F));
      parts[h + 2] = _mm256_and_si256(_mm256_srli_epi16(flipped, 4), _mm256_set1_epi8(0x0F));
    } else {
      parts[h] = raw;
    }
  }
  for (int m = 0; m < M; ++m) {
    const int8_t* q = act.q.get() + (m0 + m) * act.padded + c * kChunk;
    const __m256 scales = _mm256_broadcast_ps(
        reinterpret_cast<const __m128*>(act.scales.get() + ((m0 + m) * (act.padded / kChunk) + c) * 4));
    __m256i a[4];
    for (int p = 0; p < 4; ++p) a[p] = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32 * p));
    __m256i dot;
    if constexpr (Int4) {  // int16 pair sums of 2 * 15 * 127 at most: two halves add without overflow
      const __m256i first = _mm256_add_epi16(_mm256_maddubs_epi16(parts[0], a[0]), _mm256_maddubs_epi16(parts[2], a[2]));
      const __m256i second = _mm256_add_epi16(_mm256_maddubs_epi16(parts[1], a[1]), _mm256_maddubs_epi16(parts[3], a[3]));
      dot = _mm256_add_epi32(_mm256_madd_epi16(first, ones), _mm256_madd_epi16(second, ones));
    } else {  // up to 2 * 127 * 127 per pair: each product register widens to int32 on its own
      dot = _mm256_setzero_si256();
      for (int p = 0; p < 4; ++p) {
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(a[p]), _mm256_sign_epi8(parts[p], a[p]));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
      }
    }
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scales, acc[m]);
  }
}

// Output `row` for activation rows [m0, m0 + M).
template <int M, bool Int4>
GLMTUNE_AVX2 void tile(const QuantArgs& a, int64_t row, int64_t m0) {
  const Activations& act = *a.act;
  const int64_t bytes = Int4 ? act.k / 2 : act.k, per_chunk = Int4 ? 64 : kChunk;
  const int64_t full = bytes / per_chunk, tail = bytes % per_chunk;
  const int8_t* w = a.weight + row * bytes;
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < full; ++c) step<M, Int4>(acc, w + c * per_chunk, act, m0, c);
  if (tail) {
    alignas(32) int8_t last[kChunk] = {};
    std::memcpy(last, w + full * per_chunk, tail);
    step<M, Int4>(acc, last, act, m0, full);
  }
  const float scale = load_float(a.scale, a.scale_dtype, row);
  const float bias = a.bias ? load_float(a.bias, a.bias_dtype, row) : 0.0f;
  for (int m = 0; m < M; ++m) {
    const float dot = hsum(acc[m]) - (Int4 ? act.corrections.get()[m0 + m] : 0.0f);
    store_float(a.out, a.out_dtype, (m0 + m) * a.n + row, dot * scale + bias);
  }
}

template <bool Int4>
GLMTUNE_AVX2 void rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1) {
  for (int64_t row = n0; row < n1; ++row) {
    for (int64_t m0 = 0; m0 < a.act->rows; m0 += kTile) {
      if (a.act->rows - m0 == 1) tile<1, Int4>(a, row, m0);
      else tile<2, Int4>(a, row, m0);
    }
  }
}

}  // namespace

void int4_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1) { rows_avx2<true>(a, n0, n1); }
void int8_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1) { rows_avx2<false>(a, n0, n1); }

}  // namespace glmtune
