// glmtune CPU decode kernels: shared declarations. The kernel files are plain C++ over raw pointers (no torch
// headers, so they compile in about a second); ops.cpp checks tensors, allocates and runs them on torch's threads.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>

namespace glmtune {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// CPU feature bits (cpu_features()): each names a kernel path whose instructions this CPU and OS can run.
enum Feature : int64_t {
  kAvx512Vnni = 1,  // avx512f/bw/vl/dq + avx512vnni: int4 / int8 with _mm512_dpbusd_epi32
  kAvx512Bf16 = 2,  // + avx512bf16: bf16 GEMV with _mm512_dpbf16_ps
  kAvx2 = 4,        // avx2 + fma: int4 / int8 with _mm256_maddubs_epi16
};
int64_t cpu_features();                  // the detected features, limited by the last limit_features() mask
int64_t limit_features(int64_t mask);    // keep only `mask`'s paths (GLMTUNE_CPU_KERNELS=avx2); returns the rest

constexpr int64_t kBlock = 32;   // activations are quantized to int8 in blocks of 32 values, fp32 scale each
constexpr int64_t kChunk = 128;  // values per kernel step: 64 int4 weight bytes, or two 64-byte int8 loads
constexpr int kMaxTile = 4;      // activation rows computed per pass over the weight

// 64-byte aligned, zero-filled scratch memory.
template <typename T>
struct Buffer {
  std::unique_ptr<T[], void (*)(T*)> data{nullptr, [](T*) {}};
  void resize(int64_t count) {
    data = std::unique_ptr<T[], void (*)(T*)>(
        static_cast<T*>(::operator new[](sizeof(T) * (count > 0 ? count : 1), std::align_val_t(64))),
        [](T* p) { ::operator delete[](p, std::align_val_t(64)); });
    std::memset(data.get(), 0, sizeof(T) * (count > 0 ? count : 1));
  }
  T* get() const { return data.get(); }
};

// Activations of `rows` rows quantized to int8, in the order one kernel reads them, per chunk of kChunk values.
// Order: int8 natural; int4 odd values of the chunk first, then even ones (the low nibbles of 64 weight bytes
// hold the odd values). The kernels sum products into int32 lanes of four neighbouring values; lane i of a
// chunk (i = 0..31, both 64-value halves) belongs to block i % 4, so one 4-float broadcast scales every lane.
// The AVX512 kernels multiply unsigned weights (int4: s + 8, int8: w + 128): `corrections` holds 8 or 128 *
// sum over blocks of (scale * value sum), which they subtract once per output; the AVX2 int8 kernel, which
// multiplies signed weights, adds it back (its int16 pair sums could not hold 2 * 255 * 127).
struct Activations {
  int64_t rows = 0, k = 0, padded = 0;  // padded: k rounded up to kChunk, the extra values zero
  Buffer<int8_t> q;                     // [rows][padded]
  Buffer<float> scales;                 // [rows][padded / kChunk][4]
  Buffer<float> corrections;            // [rows]
};

// Quantize `rows` x `k` activations (row stride `ld` elements) for the int4 (bits 4) or int8 (bits 8) kernel.
void quantize_activations(const void* x, DType dtype, int64_t rows, int64_t k, int64_t ld, int bits,
                          Activations& out);

// Output rows [n0, n1) of  out[m, n] = scale[n] * dot(activations[m], weight[n]) + bias[n]  for every m.
struct QuantArgs {
  const Activations* act;
  const int8_t* weight;     // int4: [n][k / 2] packed bytes, element 2j in the high nibble; int8: [n][k]
  const void* scale;        // [n] in scale_dtype (checkpoints: fp16)
  DType scale_dtype;
  const void* bias;         // [n] in bias_dtype, or null
  DType bias_dtype;
  void* out;                // [rows][n] in out_dtype
  DType out_dtype;
  int64_t n;
};
void int4_rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1);
void int8_rows_avx512(const QuantArgs& a, int64_t n0, int64_t n1);
void int4_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1);
void int8_rows_avx2(const QuantArgs& a, int64_t n0, int64_t n1);

// bf16 out[m, n] = dot(x[m], weight[n]) + bias[n] with fp32 accumulation, rows [n0, n1).
struct Bf16Args {
  const uint16_t* x;       // [rows][k]
  int64_t rows, k;
  const uint16_t* weight;  // [n][k]
  const void* bias;        // [n] in bias_dtype, or null
  DType bias_dtype;
  uint16_t* out;           // [rows][n]
  int64_t n;
};
void bf16_rows_avx512(const Bf16Args& a, int64_t n0, int64_t n1);

// Scalar conversions (round to nearest even, NaN kept), shared by the kernels' loads and stores.
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  return bits_to_float(sign | float_to_bits(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u, mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (mag >= 0x38800000u) {
    uint32_t r = mag - 0x38000000u;
    r += 0x0FFFu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (mag <= 0x33000000u) return static_cast<uint16_t>(sign);
  uint32_t shift = 126u - (mag >> 23), significand = (mag & 0x7FFFFFu) | 0x800000u;
  uint32_t units = significand >> shift, rest = significand & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (units & 1u))) units += 1u;
  return static_cast<uint16_t>(sign | units);
}

inline float load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_float(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

}  // namespace glmtune
