// String ops: StringNormalizer, StringConcat, StringSplit, RegexFullMatch; and TfIdfVectorizer.
#include <algorithm>
#include <cctype>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "ops/control/control_util.h"
#include "ops/op.h"
#include "ops/util.h"

namespace kiln {

namespace {

Result<const Tensor*> req_string(const OpContext& ctx, std::span<const Value> in, size_t i) {
  KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, i));
  if (t->dtype() != DataType::kString)
    return ctx.bad_input("input " + std::to_string(i) + " must be a string tensor, got " +
                         t->describe());
  return t;
}

// Simple case mapping of one code point: ASCII, Latin-1, Latin Extended-A, Greek, Cyrillic
// (what locale-aware towupper/towlower do for these blocks); others map to themselves.
char32_t map_case(char32_t c, bool upper) {
  if (c < 0x80) {
    if (upper && c >= 'a' && c <= 'z') return c - 32;
    if (!upper && c >= 'A' && c <= 'Z') return c + 32;
    return c;
  }
  if (upper) {
    if (c >= 0xE0 && c <= 0xFE && c != 0xF7) return c - 0x20;
    if (c == 0xFF) return 0x178;
    if (c == 0x131) return 'I';
    if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return c & ~char32_t{1};
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c : c - 1;
    if (c >= 0x3B1 && c <= 0x3CB && c != 0x3C2) return c - 0x20;
    if (c >= 0x430 && c <= 0x44F) return c - 0x20;
    if (c >= 0x450 && c <= 0x45F) return c - 0x50;
  } else {
    if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 0x20;
    if (c == 0x178) return 0xFF;
    if (c == 0x130) return 'i';
    if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return c | 1;
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c + 1 : c;
    if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) return c + 0x20;
    if (c >= 0x410 && c <= 0x42F) return c + 0x20;
    if (c >= 0x400 && c <= 0x40F) return c + 0x50;
  }
  return c;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Decodes the UTF-8 sequence at s[i] into c; returns its length, or 0 if malformed.
size_t utf8_step(const std::string& s, size_t i, char32_t& c) {
  const unsigned char b = static_cast<unsigned char>(s[i]);
  const size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return 0;
  c = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
  for (size_t k = 1; k < len; ++k) {
    const unsigned char cb = static_cast<unsigned char>(s[i + k]);
    if ((cb & 0xC0) != 0x80) return 0;
    c = (c << 6) | (cb & 0x3F);
  }
  return len;
}

// Case-maps UTF-8 text; malformed bytes pass through unchanged.
std::string to_case(const std::string& s, bool upper) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    char32_t c = 0;
    const size_t len = utf8_step(s, i, c);
    if (len == 0) {
      out += s[i++];
      continue;
    }
    append_utf8(out, map_case(c, upper));
    i += len;
  }
  return out;
}

// UTF-8 to code points (one wchar_t each; malformed bytes become U+FFFD), so that regex `.`
// and counted repeats see characters as RE2 does, not bytes.
std::wstring utf8_to_wide(const std::string& s) {
  static_assert(sizeof(wchar_t) == 4, "wregex over UTF-32 needs a 32-bit wchar_t");
  std::wstring w;
  w.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    char32_t c = 0;
    const size_t len = utf8_step(s, i, c);
    w += static_cast<wchar_t>(len ? c : 0xFFFD);
    i += len ? len : 1;
  }
  return w;
}

// Drops space-separated words found in `stops` (the ONNX reference's stopword rule).
std::string remove_stopwords(const std::string& text, const std::set<std::string>& stops) {
  std::string out;
  bool first = true;
  size_t b = 0;
  while (true) {
    size_t e = text.find(' ', b);
    std::string w = text.substr(b, e == std::string::npos ? std::string::npos : e - b);
    if (!stops.count(w)) {
      if (!first) out += ' ';
      out += w;
      first = false;
    }
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return out;
}

Status eval_string_normalizer(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_string(ctx, in, 0));
  if (x->rank() != 1 && !(x->rank() == 2 && x->dim(0) == 1))
    return ctx.bad_input("input must be [C] or [1,C], got " + x->describe());
  const std::string action = ctx.node.attr_string("case_change_action", "NONE");
  if (action != "NONE" && action != "LOWER" && action != "UPPER")
    return ctx.bad_input("unknown case_change_action '" + action + "'");
  const bool sensitive = ctx.node.attr_int("is_case_sensitive", 0) != 0;
  std::vector<std::string> stopwords = ctx.node.attr_strings("stopwords");
  std::set<std::string> raw_stops(stopwords.begin(), stopwords.end()), stops;
  for (const auto& w : stopwords)
    stops.insert(action == "NONE" ? w : to_case(w, action == "UPPER"));
  std::vector<std::string> res;
  for (const std::string& s0 : x->span<std::string>()) {
    std::string s = s0;
    if (sensitive && !raw_stops.empty()) s = remove_stopwords(s, raw_stops);
    if (action != "NONE") s = to_case(s, action == "UPPER");
    if (!sensitive && !stops.empty()) {
      // Case-insensitive: compare in the target case (lower when the case is kept).
      if (action == "NONE") {
        std::set<std::string> lower;
        for (const auto& w : stopwords) lower.insert(to_case(w, false));
        std::string kept;
        bool first = true;
        size_t b = 0;
        while (true) {
          size_t e = s.find(' ', b);
          std::string w = s.substr(b, e == std::string::npos ? std::string::npos : e - b);
          if (!lower.count(to_case(w, false))) {
            if (!first) kept += ' ';
            kept += w;
            first = false;
          }
          if (e == std::string::npos) break;
          b = e + 1;
        }
        s = kept;
      } else {
        s = remove_stopwords(s, stops);
      }
    }
    if (!s.empty()) res.push_back(std::move(s));
  }
  if (res.empty()) res.push_back("");
  Shape shape = x->rank() == 1 ? Shape{static_cast<int64_t>(res.size())}
                               : Shape{1, static_cast<int64_t>(res.size())};
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(DataType::kString, shape));
  for (size_t i = 0; i < res.size(); ++i) t.data<std::string>()[i] = std::move(res[i]);
  out[0] = std::move(t);
  return Status::ok();
}

Status eval_string_concat(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* a, req_string(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* b, req_string(ctx, in, 1));
  auto shape = broadcast_shapes(a->shape(), b->shape());
  if (!shape.is_ok()) return shape.status().with_context(ctx.node.where());
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(DataType::kString, *shape));
  const std::vector<int64_t> st[2] = {broadcast_strides(a->shape(), *shape),
                                      broadcast_strides(b->shape(), *shape)};
  const std::string* pa = a->data<std::string>();
  const std::string* pb = b->data<std::string>();
  std::string* po = t.data<std::string>();
  broadcast_for_each(*shape, st,
                     [&](int64_t i, const int64_t* off) { po[i] = pa[off[0]] + pb[off[1]]; });
  out[0] = std::move(t);
  return Status::ok();
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// Python str.split semantics: sep empty = runs of whitespace; maxsplit < 0 = unlimited.
std::vector<std::string> py_split(const std::string& s, const std::string& sep, int64_t maxsplit) {
  std::vector<std::string> r;
  if (sep.empty()) {
    size_t i = 0, n = s.size();
    while (true) {
      while (i < n && is_space(s[i])) ++i;
      if (i >= n) break;
      if (maxsplit >= 0 && static_cast<int64_t>(r.size()) == maxsplit) {
        r.push_back(s.substr(i));
        break;
      }
      size_t j = i;
      while (j < n && !is_space(s[j])) ++j;
      r.push_back(s.substr(i, j - i));
      i = j;
    }
    return r;
  }
  size_t b = 0;
  int64_t splits = 0;
  while (true) {
    size_t e = (maxsplit >= 0 && splits >= maxsplit) ? std::string::npos : s.find(sep, b);
    if (e == std::string::npos) {
      r.push_back(s.substr(b));
      break;
    }
    r.push_back(s.substr(b, e - b));
    b = e + sep.size();
    ++splits;
  }
  return r;
}

Status eval_string_split(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_string(ctx, in, 0));
  const std::string sep = ctx.node.attr_string("delimiter", "");
  const int64_t maxsplit = ctx.node.has_attr("maxsplit") ? ctx.node.attr_int("maxsplit", -1) : -1;
  std::vector<std::vector<std::string>> parts;
  size_t width = 0;
  for (const std::string& s : x->span<std::string>()) {
    parts.push_back(py_split(s, sep, maxsplit));
    width = std::max(width, parts.back().size());
  }
  Shape ys = x->shape();
  ys.push_back(static_cast<int64_t>(width));
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kString, ys));
  KILN_ASSIGN_OR_RETURN(Tensor z, Tensor::create(DataType::kInt64, x->shape()));
  for (size_t i = 0; i < parts.size(); ++i) {
    z.data<int64_t>()[i] = static_cast<int64_t>(parts[i].size());
    for (size_t k = 0; k < parts[i].size(); ++k)
      y.data<std::string>()[i * width + k] = std::move(parts[i][k]);
  }
  out[0] = std::move(y);
  if (out.size() > 1) out[1] = std::move(z);
  return Status::ok();
}

// Rewrites the common RE2-only spellings into ECMAScript: (?i) prefix, \A, \z, (?P<name>...),
// (?:...) is shared. Returns false for constructs ECMAScript cannot express.
bool re2_to_ecma(const std::string& p, std::string& out, bool& icase) {
  out.clear();
  icase = false;
  size_t i = 0;
  if (p.rfind("(?i)", 0) == 0) {
    icase = true;
    i = 4;
  }
  for (; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char d = p[i + 1];
      if (d == 'A')
        out += '^';
      else if (d == 'z')
        out += '$';
      else if (d == 'p' || d == 'P' || d == 'C')
        return false;  // Unicode classes
      else {
        out += c;
        out += d;
      }
      ++i;
      continue;
    }
    if (c == '(' && p.compare(i, 4, "(?P<") == 0) {
      size_t e = p.find('>', i);
      if (e == std::string::npos) return false;
      out += '(';
      i = e;
      continue;
    }
    if (c == '(' && i + 2 < p.size() && p[i + 1] == '?' && p[i + 2] != ':' && p[i + 2] != '=' &&
        p[i + 2] != '!')
      return false;  // inline flags mid-pattern
    out += c;
  }
  return true;
}

Status eval_regex_full_match(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_string(ctx, in, 0));
  const std::string pat = ctx.node.attr_string("pattern", "");
  std::string ecma;
  bool icase = false;
  if (!re2_to_ecma(pat, ecma, icase))
    return unsupported(ctx.node.where() +
                       ": regex pattern uses RE2 syntax Kiln cannot translate: " + pat);
  std::wregex re;
  try {
    auto flags = std::regex::ECMAScript | (icase ? std::regex::icase : std::regex::ECMAScript);
    re = std::wregex(utf8_to_wide(ecma), flags);
  } catch (const std::regex_error& e) {
    return ctx.bad_input("invalid regex pattern '" + pat + "': " + e.what());
  }
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kBool, x->shape()));
  const std::string* px = x->data<std::string>();
  try {
    for (int64_t i = 0; i < x->numel(); ++i)
      y.data<bool>()[i] = std::regex_match(utf8_to_wide(px[i]), re);
  } catch (const std::regex_error& e) {
    return ctx.fail(std::string("regex evaluation failed: ") + e.what());
  }
  out[0] = std::move(y);
  return Status::ok();
}

// ---------------------------------------------------------------- TfIdfVectorizer
// N-gram trie over pool items (int64 or string keys), as in the ONNX reference.
template <typename K>
struct GramNode {
  int64_t id = 0;  // 0: not an n-gram end
  std::map<K, GramNode> kids;
};

template <typename K>
Status tfidf_run(OpContext& ctx, const Tensor& x, const std::vector<K>& pool,
                 std::span<const Value> /*in*/, std::span<Value> out,
                 const std::function<K(int64_t)>& get) {
  const Node& n = ctx.node;
  const int64_t min_n = n.attr_int("min_gram_length", 0), max_n = n.attr_int("max_gram_length", 0);
  const int64_t max_skip = n.attr_int("max_skip_count", 0);
  const std::string mode = n.attr_string("mode", "");
  const std::vector<int64_t> counts = n.attr_ints("ngram_counts");
  const std::vector<int64_t> indexes = n.attr_ints("ngram_indexes");
  const std::vector<float> weights = n.attr_floats("weights");
  if (mode != "TF" && mode != "IDF" && mode != "TFIDF")
    return ctx.bad_input("unknown mode '" + mode + "'");
  if (min_n < 1 || max_n < min_n || max_skip < 0)
    return ctx.bad_input("invalid gram lengths / skip count");
  if (indexes.empty()) return ctx.bad_input("ngram_indexes is empty");
  int64_t out_size = 0;
  for (int64_t v : indexes) {
    if (v < 0) return ctx.bad_input("negative ngram index");
    out_size = std::max(out_size, v + 1);
  }
  if (!weights.empty() && static_cast<int64_t>(weights.size()) < out_size)
    return ctx.bad_input("weights shorter than the output size");
  GramNode<K> root;
  int64_t gram_id = 1;
  const int64_t total = static_cast<int64_t>(pool.size());
  for (size_t i = 0; i < counts.size(); ++i) {
    const int64_t gsize = static_cast<int64_t>(i) + 1;
    const int64_t b = counts[i];
    const int64_t e = i + 1 < counts.size() ? counts[i + 1] : total;
    if (b < 0 || e > total || b > e) return ctx.bad_input("ngram_counts out of range of the pool");
    const int64_t grams = (e - b) / gsize;
    if (gsize >= min_n && gsize <= max_n) {
      int64_t idx = b;
      for (int64_t g = 0; g < grams; ++g) {
        GramNode<K>* m = &root;
        for (int64_t k = 0; k < gsize; ++k) m = &m->kids[pool[static_cast<size_t>(idx++)]];
        m->id = gram_id++;
      }
    } else {
      gram_id += grams;
    }
  }
  if (gram_id - 1 > static_cast<int64_t>(indexes.size()))
    return ctx.bad_input("ngram_indexes has fewer entries than there are n-grams");
  int64_t rows = 1, C = 0, B = 0;
  if (x.rank() == 0)
    C = 1;
  else if (x.rank() == 1)
    C = x.dim(0);
  else if (x.rank() == 2) {
    B = rows = x.dim(0);
    C = x.dim(1);
    if (B < 1) return ctx.bad_input("input [B,C] needs B > 0");
  } else {
    return ctx.bad_input("input must be [C] or [B,C], got " + x.describe());
  }
  // Allocate the output first: its size check guards against hostile ngram_indexes.
  Shape os = B == 0 ? Shape{out_size} : Shape{B, out_size};
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(DataType::kFloat, os));
  std::vector<int64_t> freq(static_cast<size_t>(y.numel()), 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t start_n = min_n;
    for (int64_t skip = 1; skip <= max_skip + 1; ++skip) {
      for (int64_t s = 0; s < C; ++s) {
        if (s + skip * (start_n - 1) >= C) break;
        const GramNode<K>* m = &root;
        int64_t item = s;
        for (int64_t gs = 1; gs <= max_n && item < C && !m->kids.empty(); ++gs, item += skip) {
          auto it = m->kids.find(get(r * C + item));
          if (it == m->kids.end()) break;
          if (gs >= start_n && it->second.id != 0)
            ++freq[static_cast<size_t>(r * out_size +
                                       indexes[static_cast<size_t>(it->second.id - 1)])];
          m = &it->second;
        }
      }
      if (start_n == 1) {
        ++start_n;
        if (start_n > max_n) break;
      }
    }
  }
  float* py = y.data<float>();
  for (size_t p = 0; p < freq.size(); ++p) {
    const float f = static_cast<float>(freq[p]);
    const size_t col = p % static_cast<size_t>(out_size);
    if (mode == "TF")
      py[p] = f;
    else if (mode == "IDF")
      py[p] = freq[p] > 0 ? (weights.empty() ? 1.f : weights[col]) : 0.f;
    else
      py[p] = weights.empty() ? f : weights[col] * f;
  }
  out[0] = std::move(y);
  return Status::ok();
}

Status eval_tfidf(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->dtype() == DataType::kString) {
    std::vector<std::string> pool = ctx.node.attr_strings("pool_strings");
    const std::string* px = x->data<std::string>();
    return tfidf_run<std::string>(ctx, *x, pool, in, out, [&](int64_t i) { return px[i]; });
  }
  if (x->dtype() != DataType::kInt32 && x->dtype() != DataType::kInt64)
    return ctx.bad_input("input must be string, int32 or int64, got " + x->describe());
  std::vector<int64_t> pool = ctx.node.attr_ints("pool_int64s");
  return tfidf_run<int64_t>(ctx, *x, pool, in, out, [&](int64_t i) { return x->get_i64(i); });
}

// Type inference: element types always; shapes where they follow from the input.
Status infer_regex(InferContext& ctx) {
  ctx.output_types[0] = ctl::like_input(ctx, 0, DataType::kBool);
  return Status::ok();
}
Status infer_string_only(InferContext& ctx) {
  ctx.output_types[0] = TypeInfo::tensor(DataType::kString);
  return Status::ok();
}
Status infer_string_split(InferContext& ctx) {
  TypeInfo y = ctl::like_input(ctx, 0, DataType::kString);
  if (y.has_shape) y.dims.push_back(Dim{});
  ctx.output_types[0] = y;
  if (ctx.output_types.size() > 1) ctx.output_types[1] = ctl::like_input(ctx, 0, DataType::kInt64);
  return Status::ok();
}
Status infer_tfidf(InferContext& ctx) {
  ctx.output_types[0] = TypeInfo::tensor(DataType::kFloat);
  return Status::ok();
}

}  // namespace

const OpDef kOp_StringNormalizer = {"StringNormalizer", "", &eval_string_normalizer,
                                    &infer_string_only};
const OpDef kOp_StringConcat = {"StringConcat", "", &eval_string_concat, &infer_string_only};
const OpDef kOp_StringSplit = {"StringSplit", "", &eval_string_split, &infer_string_split};
const OpDef kOp_RegexFullMatch = {"RegexFullMatch", "", &eval_regex_full_match, &infer_regex};
const OpDef kOp_TfIdfVectorizer = {"TfIdfVectorizer", "", &eval_tfidf, &infer_tfidf};

}  // namespace kiln
