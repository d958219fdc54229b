// bf16 weight x bf16 activation GEMV with AVX512-BF16 (_mm512_dpbf16_ps: pairs of bf16 products added into
// fp32 lanes). Weight rows are read one after another (one sequential stream per thread), every activation row
// of the call reuses each 64-byte piece while it is in L1, two accumulators per row hide the instruction's
// latency, and the fp32 sums get the bias and one rounding to bf16.
#include <immintrin.h>

#include "kernels.h"

#define GLMTUNE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define GLMTUNE_INLINE inline __attribute__((always_inline))

namespace glmtune {
namespace {

template <int M>
GLMTUNE_BF16 GLMTUNE_INLINE void bf16_step(__m512 (&acc)[M], const Bf16Args& a, const uint16_t* w, int64_t m0,
                                           int64_t c, __mmask32 mask) {
  const __m512bh wc = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c * 32);
  for (int m = 0; m < M; ++m) {
    acc[m] = _mm512_dpbf16_ps(acc[m], wc, (__m512bh)_mm512_maskz_loadu_epi16(mask, a.x + (m0 + m) * a.k + c * 32));
  }
}

// Output `row` for activation rows [m0, m0 + M).
template <int M>
GLMTUNE_BF16 void bf16_tile(const Bf16Args& a, int64_t row, int64_t m0) {
  const int64_t full = a.k / 32, tail = a.k % 32;
  const uint16_t* w = a.weight + row * a.k;
  __m512 even[M], odd[M];
  for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_ps();
  const __mmask32 all = ~__mmask32{0};
  int64_t c = 0;
  for (; c + 2 <= full; c += 2) {
    bf16_step<M>(even, a, w, m0, c, all);
    bf16_step<M>(odd, a, w, m0, c + 1, all);
  }
  if (c < full) bf16_step<M>(even, a, w, m0, c, all);
  if (tail) bf16_step<M>(odd, a, w, m0, full, (__mmask32{1} << tail) - 1);
  const float bias = a.bias ? load_float(a.bias, a.bias_dtype, row) : 0.0f;
  for (int m = 0; m < M; ++m) {
    a.out[(m0 + m) * a.n + row] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m])) + bias);
  }
}

}  // namespace

void bf16_rows_avx512(const Bf16Args& a, int64_t n0, int64_t n1) {
  for (int64_t row = n0; row < n1; ++row) {  // more than kMaxTile activation rows reuse the row from L1
    for (int64_t m0 = 0; m0 < a.rows; m0 += kMaxTile) {
      switch (a.rows - m0 < kMaxTile ? a.rows - m0 : kMaxTile) {
        case 1: bf16_tile<1>(a, row, m0); break;
        case 2: bf16_tile<2>(a, row, m0); break;
        case 3: bf16_tile<3>(a, row, m0); break;
        default: bf16_tile<4>(a, row, m0);
      }
    }
  }
}

}  // namespace glmtune
