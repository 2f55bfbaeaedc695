// Float8 / float4 / float8e8m0 codecs for the CUDA Cast kernel, a line-for-line port of the
// reference in src/ops/cast.cpp (encode_minifloat, decode_minifloat, encode_e8m0). Host and
// device: the host build lets a plain C++ test compare it with the reference.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KILN_EW_HD __host__ __device__ __forceinline__
#else
#define KILN_EW_HD inline
#endif

namespace kiln::cuda::ew {

// Values of kiln::DataType used here (ONNX enum).
enum : int {
  kDtF8E4M3FN = 17,
  kDtF8E4M3FNUZ = 18,
  kDtF8E5M2 = 19,
  kDtF8E5M2FNUZ = 20,
  kDtF4E2M1 = 23,
  kDtF8E8M0 = 24,
};
enum : int { kRoundUp = 0, kRoundDown = 1, kRoundNearest = 2 };  // E8M0Round order

struct F8Fmt {
  int mbits;
  int bias;
  double maxv;
  bool fnuz;     // no negative zero, NaN = 0x80, no inf
  bool has_inf;  // e5m2
};

KILN_EW_HD bool f8_fmt(int t, F8Fmt& f) {
  switch (t) {
    case kDtF8E4M3FN:
      f = {3, 7, 448.0, false, false};
      return true;
    case kDtF8E4M3FNUZ:
      f = {3, 8, 240.0, true, false};
      return true;
    case kDtF8E5M2:
      f = {2, 15, 57344.0, false, true};
      return true;
    case kDtF8E5M2FNUZ:
      f = {2, 16, 57344.0, true, false};
      return true;
    case kDtF4E2M1:
      f = {1, 1, 6.0, false, false};
      return true;
    default:
      return false;
  }
}

KILN_EW_HD uint8_t encode_minifloat(const F8Fmt& f, int total_bits, double x, bool saturate,
                                    bool is_f4) {
  const int sign_shift = total_bits - 1;
  const uint8_t sign = signbit(x) ? 1 : 0;
  const uint8_t sbit = static_cast<uint8_t>(sign << sign_shift);
  const uint8_t max_mag = is_f4 ? 0x7 : (f.fnuz ? 0x7F : (f.has_inf ? 0x7B : 0x7E));
  if (isnan(x)) {
    if (is_f4) return sign ? 0x0 : 0x8;
    if (f.fnuz) return 0x80;
    return static_cast<uint8_t>(sbit | (f.has_inf ? 0x7E : 0x7F));
  }
  uint8_t overflow;
  if (saturate || is_f4)
    overflow = static_cast<uint8_t>(sbit | max_mag);
  else if (f.fnuz)
    overflow = 0x80;
  else
    overflow = static_cast<uint8_t>(sbit | (f.has_inf ? 0x7C : 0x7F));
  const double a = fabs(x);
  if (isinf(a)) return overflow;
  const int emin = 1 - f.bias;
  int e = 0;
  frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const int ue = e - 1 > emin ? e - 1 : emin;
  const double quantum = ldexp(1.0, ue - f.mbits);
  const double q = nearbyint(a / quantum);  // round half to even
  const double v = q * quantum;
  if (v > f.maxv) return overflow;
  if (v == 0) return f.fnuz ? 0 : sbit;
  frexp(v, &e);
  const int ue2 = e - 1;
  uint32_t code;
  if (ue2 < emin) {
    code = static_cast<uint32_t>(v / ldexp(1.0, emin - f.mbits));
  } else {
    const uint32_t man =
        static_cast<uint32_t>(v / ldexp(1.0, ue2 - f.mbits)) - (1u << f.mbits);
    code = (static_cast<uint32_t>(ue2 + f.bias) << f.mbits) | man;
  }
  return static_cast<uint8_t>(sbit | code);
}

KILN_EW_HD double decode_minifloat(const F8Fmt& f, int total_bits, uint8_t b, bool is_f4) {
  const int ebits = total_bits - 1 - f.mbits;
  const bool neg = (b >> (total_bits - 1)) & 1;
  const uint32_t e = (b >> f.mbits) & ((1u << ebits) - 1);
  const uint32_t m = b & ((1u << f.mbits) - 1);
  const double nan = __builtin_nan("");
  if (!is_f4) {
    if (f.fnuz && b == 0x80) return nan;
    if (!f.fnuz && e == (1u << ebits) - 1) {
      if (f.has_inf) return m == 0 ? (neg ? -HUGE_VAL : HUGE_VAL) : nan;
      if (m == (1u << f.mbits) - 1) return nan;
    }
  }
  double v;
  if (e == 0)
    v = ldexp(static_cast<double>(m), 1 - f.bias - f.mbits);
  else
    v = ldexp(1.0 + static_cast<double>(m) / (1u << f.mbits), static_cast<int>(e) - f.bias);
  return neg ? -v : v;
}

KILN_EW_HD uint8_t encode_e8m0(double x, bool saturate, int rm) {
  const float xf = static_cast<float>(x);
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(xf);
#else
  memcpy(&bits, &xf, 4);
#endif
  uint32_t exponent = (bits >> 23) & 0xFF;
  if (exponent == 0xFF) return 0xFF;
  const uint32_t frac = bits & 0x7FFFFF;
  bool up = false;
  if (rm == kRoundUp) {
    up = frac != 0;
  } else if (rm == kRoundNearest) {
    const bool g = bits & 0x400000, r = bits & 0x200000, s = (bits & 0x1FFFFF) != 0;
    const bool lsb = exponent > 0;
    up = g && (r || s || lsb);
  }
  if (up && saturate && exponent == 0xFE) up = false;
  if (up) exponent += 1;
  return static_cast<uint8_t>(exponent & 0xFF);
}

// small_float_decode / small_float_encode of the reference.
KILN_EW_HD double small_decode(int t, uint8_t code) {
  if (t == kDtF8E8M0) {
    if (code == 0xFF) return __builtin_nan("");
    return ldexp(1.0, static_cast<int>(code) - 127);
  }
  F8Fmt f;
  if (!f8_fmt(t, f)) return 0;
  const bool f4 = t == kDtF4E2M1;
  return decode_minifloat(f, f4 ? 4 : 8, f4 ? (code & 0xF) : code, f4);
}

KILN_EW_HD uint8_t small_encode(int t, double v, bool saturate, int rm) {
  if (t == kDtF8E8M0) return encode_e8m0(v, saturate, rm);
  F8Fmt f;
  if (!f8_fmt(t, f)) return 0;
  const bool f4 = t == kDtF4E2M1;
  return encode_minifloat(f, f4 ? 4 : 8, v, saturate, f4);
}

}  // namespace kiln::cuda::ew
