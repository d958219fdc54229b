// int4 / int8 weight x int8 activation GEMV with AVX512-VNNI (_mm512_dpbusd_epi32: u8 x s8 -> int32).
// The weight is the unsigned operand: an int4 nibble s is multiplied as s + 8 (its top bit flipped), an int8
// value w as w + 128 (its sign bit flipped), and 8 or 128 * (scaled activation sum) is subtracted once per
// output. 64 int4 bytes give 128 values, low nibbles (odd values) then high nibbles (even values); int8 takes
// two 64-byte loads. Each 128-value chunk's two products add into one int32 register whose lanes the block
// scales (a 4-float broadcast) turn into fp32 sums; the weight's per-row scale and the bias are applied once per
// output. Weight rows are read one after another: one sequential stream per thread ran 1.5-2x faster than 2 or
// 4 interleaved rows sharing activation loads, and than K-blocking with software prefetch (ChatGLM2-6B shapes,
// 2 threads, Zen4). Up to kMaxTile activation rows share each weight load, and further rows reuse the row from
// L1, so a call reads the weight from memory once.
#include <immintrin.h>

#include "kernels.h"

#define GLMTUNE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define GLMTUNE_INLINE inline __attribute__((always_inline))

namespace glmtune {
namespace {

// One 128-value chunk c of weight row w against M activation rows from m0.
template <int M, bool Int4>
GLMTUNE_AVX512 GLMTUNE_INLINE void step(__m512 (&acc)[M], const int8_t* w, const Activations& act, int64_t m0,
                                        int64_t c, __mmask64 mask0, __mmask64 mask1) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i w0, w1;
  if constexpr (Int4) {
    const __m512i raw = _mm512_maskz_loadu_epi8(mask0, w + c * 64);
    const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x08);
    w0 = _mm512_ternarylogic_epi32(raw, nibble, top, 0x6A);                      // (raw & 0x0F) ^ 0x08: odd
    w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), nibble, top, 0x6A);  // values, then even ones
  } else {  // w + 128 as unsigned: flip the sign bit (masked-off bytes become 128, times activations of 0)
    const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
    w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask0, w + c * kChunk), top);
    w1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask1, w + c * kChunk + 64), top);
  }
  for (int m = 0; m < M; ++m) {
    const int8_t* q = act.q.get() + (m0 + m) * act.padded + c * kChunk;
    const __m512i a0 = _mm512_load_si512(q), a1 = _mm512_load_si512(q + 64);
    const __m512 scales = _mm512_broadcast_f32x4(
        _mm_load_ps(act.scales.get() + ((m0 + m) * (act.padded / kChunk) + c) * 4));
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w0, a0), w1, a1);
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales, acc[m]);
  }
}

// Output `row` for activation rows [m0, m0 + M); the row's last chunk may be partial (masked loads read nothing
// past it).
template <int M, bool Int4>
GLMTUNE_AVX512 void row_tile(const QuantArgs& a, int64_t row, int64_t m0) {
  const Activations& act = *a.act;
  const int64_t bytes = Int4 ? act.k / 2 : act.k, per_chunk = Int4 ? 64 : kChunk;
  const int64_t full = bytes / per_chunk, tail = bytes % per_chunk;
  const int8_t* w = a.weight + row * bytes;
  const __mmask64 all = ~__mmask64{0};
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; ++c) step<M, Int4>(acc, w, act, m0, c, all, all);
  if (tail) {
    step<M, Int4>(acc, w, act, m0, full, tail >= 64 ? all : (__mmask64{1} << tail) - 1,
                  tail <= 64 ? 0 : (__mmask64{1} << (tail - 64)) - 1);
  }
  const float scale = load_float(a.scale, a.scale_dtype, row);
  const float bias = a.bias ? load_float(a.bias, a.bias_dtype, row) : 0.0f;
  for (int m = 0; m < M; ++m) {
    const float dot = _mm512_reduce_add_ps(acc[m]) - act.corrections.get()[m0 + m];
    store_float(a.out, a.out_dtype, (m0 + m) * a.n + row, dot * scale + bias);
  }
}

// Rows one after another; more than kMaxTile activation rows take turns on each row while it is in L1.
template <bool Int4>
GLMTUNE_AVX512 void rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1) {
  const int64_t rows = a.act->rows;
  for (int64_t row = n0; row < n1; ++row) {
    for (int64_t m0 = 0; m0 < rows; m0 += kMaxTile) {
      switch (rows - m0 < kMaxTile ? rows - m0 : kMaxTile) {
        case 1: row_tile<1, Int4>(a, row, m0); break;
        case 2: row_tile<2, Int4>(a, row, m0); break;
        case 3: row_tile<3, Int4>(a, row, m0); break;
        default: row_tile<4, Int4>(a, row, m0);
      }
    }
  }
}

}  // namespace

void int4_rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1) { rows_avx512<true>(a, n0, n1); }
void int8_rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1) { rows_avx512<false>(a, n0, n1); }

}  // namespace glmtune
