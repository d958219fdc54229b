// Per-call int8 quantization of a few activation rows (q8_0 style: blocks of 32 values, scale absmax / 127)
// in the layout the int4 / int8 kernels read, and the CPU feature probe that picks a kernel path.
#include <atomic>
#include <immintrin.h>

#include <cmath>

#include "kernels.h"

namespace glmtune {

namespace {

std::atomic<int64_t> feature_mask{~int64_t{0}};

int64_t detected_features() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  int64_t bits = 0;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) bits |= kAvx512Vnni;
  if (avx512 && __builtin_cpu_supports("avx512bf16")) bits |= kAvx512Bf16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) bits |= kAvx2;
  return bits;
#else
  return 0;
#endif
}

}  // namespace

int64_t cpu_features() {
  static const int64_t detected = detected_features();
  return detected & feature_mask.load();
}

int64_t limit_features(int64_t mask) {
  feature_mask.store(mask);
  return cpu_features();
}

namespace {

// One row as fp32 in the kernel's order (int4: each chunk's odd values first); the padding stays zero.
void load_row(const void* x, DType dtype, int64_t k, int bits, float* v) {
  if (bits == 8) {
    for (int64_t i = 0; i < k; ++i) v[i] = load_float(x, dtype, i);
    return;
  }
  for (int64_t base = 0; base < k; base += kChunk) {
    const int64_t pairs = (k - base < kChunk ? k - base : kChunk) / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      v[base + j] = load_float(x, dtype, base + 2 * j + 1);
      v[base + kChunk / 2 + j] = load_float(x, dtype, base + 2 * j);
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hmax(__m128 v) {
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_max_ss(v, _mm_movehdup_ps(v)));
}

__attribute__((target("avx2,fma"))) inline int32_t hsum(__m128i v) {
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1)));
}

// One chunk of 128 values: per block d = absmax / 127, q = round_half_even(v / d) (a correctly rounded division,
// as torch's), clamped to +-127 (a subnormal d carries few bits). A NaN or inf makes the block's scale NaN and
// its values zero, so the row's outputs become NaN as a float product's would. Returns sum of d * (sum of q).
// ymm register j holds the chunk's 4-value lanes 2j and 2j + 1, so even j hold blocks 0 and 1, odd j 2 and 3.
__attribute__((target("avx2,fma"))) double quantize_chunk(const float* v, int8_t* q, float* scales) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 bad[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int j = 0; j < 16; ++j) {
    const __m256 x = _mm256_load_ps(v + 8 * j);
    amax[j & 1] = _mm256_max_ps(amax[j & 1], _mm256_andnot_ps(sign, x));
    bad[j & 1] = _mm256_or_ps(bad[j & 1], _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  float d[4];
  for (int b = 0; b < 4; ++b) {
    const __m128 top = (b & 1) ? _mm256_extractf128_ps(amax[b >> 1], 1) : _mm256_castps256_ps128(amax[b >> 1]);
    const __m128 nan = (b & 1) ? _mm256_extractf128_ps(bad[b >> 1], 1) : _mm256_castps256_ps128(bad[b >> 1]);
    const float m = hmax(top);
    d[b] = (std::isfinite(m) && _mm_movemask_ps(nan) == 0) ? m / 127.0f : NAN;
    scales[b] = d[b];
  }
  __m256 divisor[2], keep[2];
  for (int h = 0; h < 2; ++h) {
    const float lo = d[2 * h], hi = d[2 * h + 1];
    divisor[h] = _mm256_setr_ps(lo > 0.0f ? lo : 1.0f, lo > 0.0f ? lo : 1.0f, lo > 0.0f ? lo : 1.0f,
                                lo > 0.0f ? lo : 1.0f, hi > 0.0f ? hi : 1.0f, hi > 0.0f ? hi : 1.0f,
                                hi > 0.0f ? hi : 1.0f, hi > 0.0f ? hi : 1.0f);
    const float kl = lo > 0.0f ? 1.0f : 0.0f, kh = hi > 0.0f ? 1.0f : 0.0f;
    keep[h] = _mm256_setr_ps(kl, kl, kl, kl, kh, kh, kh, kh);
  }
  const __m256 low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
  __m256i sums[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  alignas(32) int32_t values[kChunk];
  for (int j = 0; j < 16; ++j) {
    const __m256 ratio = _mm256_div_ps(_mm256_load_ps(v + 8 * j), divisor[j & 1]);
    const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(ratio, low), high), keep[j & 1]));
    sums[j & 1] = _mm256_add_epi32(sums[j & 1], r);
    _mm256_store_si256(reinterpret_cast<__m256i*>(values + 8 * j), r);
  }
  for (int i = 0; i < kChunk; ++i) q[i] = static_cast<int8_t>(values[i]);
  double total = 0.0;
  for (int b = 0; b < 4; ++b) {
    const __m128i part = (b & 1) ? _mm256_extracti128_si256(sums[b >> 1], 1) : _mm256_castsi256_si128(sums[b >> 1]);
    total += static_cast<double>(d[b]) * hsum(part);
  }
  return total;
}

}  // namespace

void quantize_activations(const void* x, DType dtype, int64_t rows, int64_t k, int64_t ld, int bits,
                          Activations& out) {
  const int64_t padded = (k + kChunk - 1) / kChunk * kChunk, chunks = padded / kChunk;
  out.rows = rows;
  out.k = k;
  out.padded = padded;
  out.q.resize(rows * padded);
  out.scales.resize(rows * chunks * 4);
  out.corrections.resize(rows);
  Buffer<float> values;
  values.resize(padded);
  const int64_t itemsize = dtype == DType::F32 ? 4 : 2;
  for (int64_t m = 0; m < rows; ++m) {
    load_row(static_cast<const char*>(x) + m * ld * itemsize, dtype, k, bits, values.get());
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      total += quantize_chunk(values.get() + c * kChunk, out.q.get() + m * padded + c * kChunk,
                              out.scales.get() + (m * chunks + c) * 4);
    }
    out.corrections.get()[m] = static_cast<float>(total * (bits == 4 ? 8.0 : 128.0));  // see Activations
  }
}

}  // namespace glmtune
