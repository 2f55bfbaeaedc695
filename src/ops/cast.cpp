// Tensor element-type conversion (ONNX Cast semantics, opset 25).
//  - float -> integer: truncate toward zero, then wrap to the target width (numpy astype);
//    NaN -> 0. int4/uint4/int2/uint2 wrap the same way.
//  - float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz): round to nearest even; `saturate` clamps
//    out-of-range values (and +-inf) to +-max, otherwise they become NaN (inf for e5m2).
//  - float4e2m1: always saturating (no inf/NaN codes).
//  - float8e8m0: exponent-only; round_mode up/down/nearest, 0xFF = NaN.
//  - string <-> numbers: shortest round-trip text; parsing accepts what strtod accepts.
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "ops/elementwise/ew_common.h"
#include "ops/util.h"

namespace kiln {

namespace {

struct F8Fmt {
  int mbits;
  int bias;
  double maxv;
  bool fnuz;     // no negative zero, NaN = 0x80, no inf
  bool has_inf;  // e5m2
};

bool f8_fmt(DataType t, F8Fmt& f) {
  switch (t) {
    case DataType::kFloat8E4M3FN:
      f = {3, 7, 448.0, false, false};
      return true;
    case DataType::kFloat8E4M3FNUZ:
      f = {3, 8, 240.0, true, false};
      return true;
    case DataType::kFloat8E5M2:
      f = {2, 15, 57344.0, false, true};
      return true;
    case DataType::kFloat8E5M2FNUZ:
      f = {2, 16, 57344.0, true, false};
      return true;
    case DataType::kFloat4E2M1:
      f = {1, 1, 6.0, false, false};
      return true;
    default:
      return false;
  }
}

uint8_t encode_minifloat(const F8Fmt& f, int total_bits, double x, bool saturate, bool is_f4) {
  const int sign_shift = total_bits - 1;
  const uint8_t sign = std::signbit(x) ? 1 : 0;
  const uint8_t sbit = static_cast<uint8_t>(sign << sign_shift);
  const uint8_t max_mag = is_f4 ? 0x7 : (f.fnuz ? 0x7F : (f.has_inf ? 0x7B : 0x7E));
  if (std::isnan(x)) {
    if (is_f4) return sign ? 0x0 : 0x8;  // what ml_dtypes (the ONNX reference) produces
    if (f.fnuz) return 0x80;
    return static_cast<uint8_t>(sbit | (f.has_inf ? 0x7E : 0x7F));
  }
  auto overflow = [&]() -> uint8_t {
    if (saturate || is_f4) return static_cast<uint8_t>(sbit | max_mag);
    if (f.fnuz) return 0x80;
    return static_cast<uint8_t>(sbit | (f.has_inf ? 0x7C : 0x7F));
  };
  double a = std::fabs(x);
  if (std::isinf(a)) return overflow();
  const int emin = 1 - f.bias;
  int e = 0;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int ue = std::max(e - 1, emin);
  double quantum = std::ldexp(1.0, ue - f.mbits);
  double q = std::nearbyint(a / quantum);  // round half to even
  double v = q * quantum;
  if (v > f.maxv) return overflow();
  if (v == 0) return f.fnuz ? 0 : sbit;
  std::frexp(v, &e);
  int ue2 = e - 1;
  uint32_t code;
  if (ue2 < emin) {
    code = static_cast<uint32_t>(v / std::ldexp(1.0, emin - f.mbits));
  } else {
    uint32_t man = static_cast<uint32_t>(v / std::ldexp(1.0, ue2 - f.mbits)) - (1u << f.mbits);
    code = (static_cast<uint32_t>(ue2 + f.bias) << f.mbits) | man;
  }
  return static_cast<uint8_t>(sbit | code);
}

double decode_minifloat(const F8Fmt& f, int total_bits, uint8_t b, bool is_f4) {
  const int ebits = total_bits - 1 - f.mbits;
  const bool neg = (b >> (total_bits - 1)) & 1;
  const uint32_t e = (b >> f.mbits) & ((1u << ebits) - 1);
  const uint32_t m = b & ((1u << f.mbits) - 1);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!is_f4) {
    if (f.fnuz && b == 0x80) return nan;
    if (!f.fnuz && e == (1u << ebits) - 1) {
      if (f.has_inf) return m == 0 ? (neg ? -INFINITY : INFINITY) : nan;
      if (m == (1u << f.mbits) - 1) return nan;
    }
  }
  double v;
  if (e == 0)
    v = std::ldexp(static_cast<double>(m), 1 - f.bias - f.mbits);
  else
    v = std::ldexp(1.0 + static_cast<double>(m) / (1u << f.mbits), static_cast<int>(e) - f.bias);
  return neg ? -v : v;
}

uint8_t encode_e8m0(double x, bool saturate, E8M0Round rm) {
  float xf = static_cast<float>(x);
  uint32_t bits;
  std::memcpy(&bits, &xf, 4);
  uint32_t exponent = (bits >> 23) & 0xFF;
  if (exponent == 0xFF) return 0xFF;
  const uint32_t frac = bits & 0x7FFFFF;
  bool up = false;
  if (rm == E8M0Round::kUp) {
    up = frac != 0;
  } else if (rm == E8M0Round::kNearest) {
    bool g = bits & 0x400000, r = bits & 0x200000, s = (bits & 0x1FFFFF) != 0;
    bool lsb = exponent > 0;
    up = g && (r || s || lsb);
  }
  if (up && saturate && exponent == 0xFE) up = false;
  if (up) exponent += 1;
  return static_cast<uint8_t>(exponent & 0xFF);
}

// double -> float rounded to odd (truncate, then set the last bit when inexact): narrowing that
// result to half/bfloat16 with round-to-nearest-even then equals one direct rounding.
float to_float_odd(double x) {
  float f = static_cast<float>(x);
  if (std::isnan(x) || std::isinf(f) || static_cast<double>(f) == x) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b |= 1;
  std::memcpy(&f, &b, 4);
  return f;
}

// A decoded element: a float value, a signed or an unsigned integer.
struct Num {
  enum Kind { kF, kI, kU } k = kI;
  double f = 0;
  int64_t i = 0;
  uint64_t u = 0;
};

int64_t safe_f2i(double v) {
  if (std::isnan(v)) return 0;
  if (v >= 9.2233720368547758e18) return std::numeric_limits<int64_t>::max();
  if (v <= -9.2233720368547758e18) return std::numeric_limits<int64_t>::min();
  return static_cast<int64_t>(v);
}

int64_t num_to_i64(const Num& n) {
  switch (n.k) {
    case Num::kF:
      return safe_f2i(n.f);
    case Num::kI:
      return n.i;
    case Num::kU:
      return static_cast<int64_t>(n.u);
  }
  return 0;
}
double num_to_f64(const Num& n) {
  switch (n.k) {
    case Num::kF:
      return n.f;
    case Num::kI:
      return static_cast<double>(n.i);
    case Num::kU:
      return static_cast<double>(n.u);
  }
  return 0;
}

Result<Num> parse_number(const std::string& s) {
  Num n;
  const char* b = s.c_str();
  while (*b == ' ' || *b == '\t') ++b;
  if (*b == 0) return invalid_argument("cannot parse '" + s + "' as a number");
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(b, &end, 10);
  if (end != b && *end == 0 && errno == 0) {
    n.k = Num::kI;
    n.i = v;
    return n;
  }
  end = nullptr;
  double d = std::strtod(b, &end);
  if (end == b) return invalid_argument("cannot parse '" + s + "' as a number");
  while (*end == ' ' || *end == '\t') ++end;
  if (*end != 0) return invalid_argument("cannot parse '" + s + "' as a number");
  n.k = Num::kF;
  n.f = d;
  return n;
}

// numpy's str() of a float: shortest round-trip digits; positional when 1e-4 <= |v| < cutoff
// (1e3 for float16, 1e6 for float32, 1e16 for float64), else scientific ("1e+06").
// `half` asks for the shortest digits that round-trip through float16.
template <typename F>
std::string format_float(F v, double cutoff, bool half = false) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  const double a = std::fabs(static_cast<double>(v));
  const bool fixed = a == 0 || (a >= 1e-4 && a < cutoff);
  char buf[128];
  std::to_chars_result r;
  if (half) {
    int p = 0;  // significant digits after the first
    for (; p < 5; ++p) {
      r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific, p);
      if (static_cast<float>(Half(std::strtof(std::string(buf, r.ptr).c_str(), nullptr))) == v) break;
    }
    if (fixed) {
      int e = 0;
      if (a != 0) e = static_cast<int>(std::floor(std::log10(a)));
      r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed, std::max(0, p - e));
      std::string s(buf, r.ptr);
      if (s.find('.') != std::string::npos) {
        while (s.back() == '0') s.pop_back();
        if (s.back() == '.') s.pop_back();
      }
      if (s.find('.') == std::string::npos) s += ".0";
      return s;
    }
    std::string s(buf, r.ptr);
    return s;
  }
  r = std::to_chars(buf, buf + sizeof(buf), v,
                    fixed ? std::chars_format::fixed : std::chars_format::scientific);
  std::string s(buf, r.ptr);
  if (fixed && s.find('.') == std::string::npos) s += ".0";
  return s;
}

Num read_num(const Tensor& t, int64_t i) {
  Num n;
  const DataType dt = t.dtype();
  switch (dt) {
    case DataType::kFloat:
      n.k = Num::kF;
      n.f = t.data<float>()[i];
      return n;
    case DataType::kDouble:
      n.k = Num::kF;
      n.f = t.data<double>()[i];
      return n;
    case DataType::kFloat16:
      n.k = Num::kF;
      n.f = static_cast<float>(t.data<Half>()[i]);
      return n;
    case DataType::kBFloat16:
      n.k = Num::kF;
      n.f = static_cast<float>(t.data<BFloat16>()[i]);
      return n;
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
      n.k = Num::kF;
      n.f = small_float_decode(dt, t.data<uint8_t>()[i]);
      return n;
    case DataType::kInt8:
    case DataType::kInt4:
    case DataType::kInt2:
      n.i = t.data<int8_t>()[i];
      return n;
    case DataType::kInt16:
      n.i = t.data<int16_t>()[i];
      return n;
    case DataType::kInt32:
      n.i = t.data<int32_t>()[i];
      return n;
    case DataType::kInt64:
      n.i = t.data<int64_t>()[i];
      return n;
    case DataType::kUInt8:
    case DataType::kUInt4:
    case DataType::kUInt2:
      n.i = t.data<uint8_t>()[i];
      return n;
    case DataType::kUInt16:
      n.i = t.data<uint16_t>()[i];
      return n;
    case DataType::kUInt32:
      n.i = t.data<uint32_t>()[i];
      return n;
    case DataType::kUInt64:
      n.k = Num::kU;
      n.u = t.data<uint64_t>()[i];
      return n;
    case DataType::kBool:
      n.i = t.data<bool>()[i] ? 1 : 0;
      return n;
    default:
      return n;
  }
}

template <typename D>
D num_to_int(const Num& n) {
  if (n.k == Num::kU) return static_cast<D>(n.u);
  return static_cast<D>(static_cast<uint64_t>(num_to_i64(n)));  // wraps
}

int64_t wrap_signed(int64_t v, int bits) {
  uint64_t m = (uint64_t{1} << bits) - 1;
  uint64_t u = static_cast<uint64_t>(v) & m;
  if (u >> (bits - 1)) return static_cast<int64_t>(u) - (int64_t{1} << bits);
  return static_cast<int64_t>(u);
}

void write_num(Tensor& t, int64_t i, const Num& n, bool saturate, E8M0Round rm) {
  const DataType dt = t.dtype();
  switch (dt) {
    case DataType::kFloat:
      t.data<float>()[i] = n.k == Num::kI   ? static_cast<float>(n.i)
                           : n.k == Num::kU ? static_cast<float>(n.u)
                                            : static_cast<float>(n.f);
      return;
    case DataType::kDouble:
      t.data<double>()[i] = num_to_f64(n);
      return;
    case DataType::kFloat16:
      t.data<Half>()[i] = Half(to_float_odd(num_to_f64(n)));
      return;
    case DataType::kBFloat16:
      t.data<BFloat16>()[i] = BFloat16(to_float_odd(num_to_f64(n)));
      return;
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
      t.data<uint8_t>()[i] = small_float_encode(dt, num_to_f64(n), saturate, rm);
      return;
    case DataType::kInt8:
      t.data<int8_t>()[i] = num_to_int<int8_t>(n);
      return;
    case DataType::kInt16:
      t.data<int16_t>()[i] = num_to_int<int16_t>(n);
      return;
    case DataType::kInt32:
      t.data<int32_t>()[i] = num_to_int<int32_t>(n);
      return;
    case DataType::kInt64:
      t.data<int64_t>()[i] = num_to_int<int64_t>(n);
      return;
    case DataType::kUInt8:
      t.data<uint8_t>()[i] = num_to_int<uint8_t>(n);
      return;
    case DataType::kUInt16:
      t.data<uint16_t>()[i] = num_to_int<uint16_t>(n);
      return;
    case DataType::kUInt32:
      t.data<uint32_t>()[i] = num_to_int<uint32_t>(n);
      return;
    case DataType::kUInt64:
      t.data<uint64_t>()[i] = num_to_int<uint64_t>(n);
      return;
    case DataType::kInt4:
      t.data<int8_t>()[i] = static_cast<int8_t>(wrap_signed(num_to_i64(n), 4));
      return;
    case DataType::kInt2:
      t.data<int8_t>()[i] = static_cast<int8_t>(wrap_signed(num_to_i64(n), 2));
      return;
    case DataType::kUInt4:
      t.data<uint8_t>()[i] = static_cast<uint8_t>(num_to_int<uint64_t>(n) & 0xF);
      return;
    case DataType::kUInt2:
      t.data<uint8_t>()[i] = static_cast<uint8_t>(num_to_int<uint64_t>(n) & 0x3);
      return;
    case DataType::kBool:
      t.data<bool>()[i] = n.k == Num::kF ? n.f != 0 : (n.k == Num::kI ? n.i != 0 : n.u != 0);
      return;
    default:
      return;
  }
}

std::string num_to_string(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DataType::kFloat:
      return format_float(t.data<float>()[i], 1e6);
    case DataType::kDouble:
      return format_float(t.data<double>()[i], 1e16);
    case DataType::kFloat16:
      return format_float(static_cast<float>(t.data<Half>()[i]), 1e3, true);
    case DataType::kBFloat16:
      return format_float(static_cast<float>(t.data<BFloat16>()[i]), 1e6);
    case DataType::kBool:
      return t.data<bool>()[i] ? "True" : "False";
    default:
      break;
  }
  Num n = read_num(t, i);
  if (n.k == Num::kF) return format_float(static_cast<float>(n.f), 1e6);
  if (n.k == Num::kU) return std::to_string(n.u);
  return std::to_string(n.i);
}

bool is_std_type(DataType t) {
  return dispatch_numeric(t, [](auto) {}) || t == DataType::kBool;
}

// Fast path for standard numeric/bool types.
template <typename S, typename D>
void cast_std(const S* src, D* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<D, bool>) {
      dst[i] = static_cast<compute_t<S>>(src[i]) != 0;
    } else if constexpr (std::is_same_v<S, bool>) {
      if constexpr (std::is_same_v<D, Half> || std::is_same_v<D, BFloat16>)
        dst[i] = D(src[i] ? 1.f : 0.f);
      else
        dst[i] = static_cast<D>(src[i] ? 1 : 0);
    } else if constexpr (std::is_same_v<D, Half> || std::is_same_v<D, BFloat16>) {
      if constexpr (std::is_same_v<S, double> || std::is_same_v<S, int64_t> ||
                    std::is_same_v<S, uint64_t> || std::is_same_v<S, int32_t> ||
                    std::is_same_v<S, uint32_t>)
        dst[i] = D(to_float_odd(static_cast<double>(src[i])));  // one rounding, not two
      else
        dst[i] = D(static_cast<float>(static_cast<compute_t<S>>(src[i])));
    } else if constexpr (std::is_integral_v<D> && !std::is_integral_v<S>) {
      // float -> int: truncate, then wrap (numpy); never UB.
      dst[i] = static_cast<D>(static_cast<uint64_t>(safe_f2i(static_cast<double>(src[i]))));
    } else {
      dst[i] = static_cast<D>(static_cast<compute_t<S>>(src[i]));
    }
  }
}

template <typename F>
bool dispatch_std(DataType dt, F&& f) {
  if (dispatch_numeric(dt, f)) return true;
  if (dt == DataType::kBool) {
    f(TypeTag<bool>{});
    return true;
  }
  return false;
}

}  // namespace

bool is_small_float(DataType t) {
  switch (t) {
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat4E2M1:
    case DataType::kFloat8E8M0:
      return true;
    default:
      return false;
  }
}

double small_float_decode(DataType t, uint8_t code) {
  if (t == DataType::kFloat8E8M0) {
    if (code == 0xFF) return std::numeric_limits<double>::quiet_NaN();
    return std::ldexp(1.0, static_cast<int>(code) - 127);
  }
  F8Fmt f;
  if (!f8_fmt(t, f)) return 0;
  const bool f4 = t == DataType::kFloat4E2M1;
  return decode_minifloat(f, f4 ? 4 : 8, f4 ? (code & 0xF) : code, f4);
}

uint8_t small_float_encode(DataType t, double v, bool saturate, E8M0Round rm) {
  if (t == DataType::kFloat8E8M0) return encode_e8m0(v, saturate, rm);
  F8Fmt f;
  if (!f8_fmt(t, f)) return 0;
  const bool f4 = t == DataType::kFloat4E2M1;
  return encode_minifloat(f, f4 ? 4 : 8, v, saturate, f4);
}

Result<Tensor> cast_tensor_ex(const Tensor& t, DataType to, bool saturate, E8M0Round rm) {
  if (t.dtype() == to) return t;
  if (!dtype_valid(static_cast<int32_t>(to)) || to == DataType::kUndefined ||
      to == DataType::kComplex64 || to == DataType::kComplex128)
    return unsupported(std::string("cast to ") + dtype_name(to) + " is not supported");
  const DataType from = t.dtype();
  if (from == DataType::kComplex64 || from == DataType::kComplex128 || from == DataType::kUndefined)
    return unsupported(std::string("cast from ") + dtype_name(from) + " is not supported");
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(to, t.shape()));
  const int64_t n = t.numel();
  if (to == DataType::kString) {
    std::string* dst = out.data<std::string>();
    for (int64_t i = 0; i < n; ++i) dst[i] = num_to_string(t, i);
    return out;
  }
  if (from == DataType::kString) {
    const std::string* src = t.data<std::string>();
    for (int64_t i = 0; i < n; ++i) {
      auto r = parse_number(src[i]);
      if (!r.is_ok()) return r.status();
      write_num(out, i, r.value(), saturate, rm);
    }
    return out;
  }
  if (is_std_type(from) && is_std_type(to)) {
    dispatch_std(from, [&](auto stag) {
      using S = typename decltype(stag)::type;
      dispatch_std(to, [&](auto dtag) {
        using D = typename decltype(dtag)::type;
        cast_std<S, D>(t.data<S>(), out.data<D>(), n);
      });
    });
    return out;
  }
  // Sub-byte / float8 kinds: per element through a decoded number.
  for (int64_t i = 0; i < n; ++i) write_num(out, i, read_num(t, i), saturate, rm);
  return out;
}

Result<Tensor> cast_tensor(const Tensor& t, DataType to, bool saturate) {
  return cast_tensor_ex(t, to, saturate, E8M0Round::kUp);
}

}  // namespace kiln
