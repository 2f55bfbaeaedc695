// ai.onnx.ml ops: LabelEncoder, ArrayFeatureExtractor, Binarizer, TreeEnsemble (opset 5).
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "ops/control/control_util.h"
#include "ops/op.h"
#include "ops/util.h"

namespace kiln {

namespace {

// ---------------------------------------------------------------- LabelEncoder
// A key compared by value: strings as text, numbers as double (NaN equals NaN).
struct Key {
  bool is_str = false;
  std::string s;
  double d = 0;
  bool operator<(const Key& o) const {
    if (is_str != o.is_str) return is_str < o.is_str;
    if (is_str) return s < o.s;
    const bool an = std::isnan(d), bn = std::isnan(o.d);
    if (an || bn) return !an && bn;
    return d < o.d;
  }
};

Key key_at(const Tensor& t, int64_t i) {
  Key k;
  if (t.dtype() == DataType::kString) {
    k.is_str = true;
    k.s = t.data<std::string>()[i];
  } else {
    k.d = t.get_f64(i);
  }
  return k;
}

Status eval_label_encoder(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const Node& n = ctx.node;
  Tensor keys, values, defv;
  if (const Tensor* t = n.attr_tensor("keys_tensor"))
    keys = *t;
  else if (n.has_attr("keys_strings")) {
    auto v = n.attr_strings("keys_strings");
    KILN_ASSIGN_OR_RETURN(keys,
                          Tensor::create(DataType::kString, {static_cast<int64_t>(v.size())}));
    for (size_t i = 0; i < v.size(); ++i) keys.data<std::string>()[i] = v[i];
  } else if (n.has_attr("keys_int64s"))
    keys = Tensor::from_vector<int64_t>({static_cast<int64_t>(n.attr_ints("keys_int64s").size())},
                                        n.attr_ints("keys_int64s"));
  else if (n.has_attr("keys_floats"))
    keys = Tensor::from_vector<float>({static_cast<int64_t>(n.attr_floats("keys_floats").size())},
                                      n.attr_floats("keys_floats"));
  else
    return ctx.bad_input("no keys_* attribute");

  if (const Tensor* t = n.attr_tensor("values_tensor")) {
    values = *t;
    if (const Tensor* d = n.attr_tensor("default_tensor"))
      defv = *d;
    else {
      KILN_ASSIGN_OR_RETURN(defv, Tensor::create(values.dtype(), {1}));
      if (values.dtype() == DataType::kString)
        defv.data<std::string>()[0] = "_Unused";
      else if (values.dtype() == DataType::kInt64)
        defv.data<int64_t>()[0] = -1;
    }
  } else if (n.has_attr("values_strings")) {
    auto v = n.attr_strings("values_strings");
    KILN_ASSIGN_OR_RETURN(values,
                          Tensor::create(DataType::kString, {static_cast<int64_t>(v.size())}));
    for (size_t i = 0; i < v.size(); ++i) values.data<std::string>()[i] = v[i];
    KILN_ASSIGN_OR_RETURN(defv, Tensor::create(DataType::kString, {1}));
    defv.data<std::string>()[0] = n.attr_string("default_string", "_Unused");
  } else if (n.has_attr("values_int64s")) {
    auto v = n.attr_ints("values_int64s");
    values = Tensor::from_vector<int64_t>({static_cast<int64_t>(v.size())}, v);
    defv = Tensor::from_vector<int64_t>({1}, {n.attr_int("default_int64", -1)});
  } else if (n.has_attr("values_floats")) {
    auto v = n.attr_floats("values_floats");
    values = Tensor::from_vector<float>({static_cast<int64_t>(v.size())}, v);
    defv = Tensor::from_vector<float>({1}, {n.attr_float("default_float", -0.0f)});
  } else {
    return ctx.bad_input("no values_* attribute");
  }
  if (keys.numel() != values.numel())
    return ctx.bad_input("keys and values differ in length: " + std::to_string(keys.numel()) +
                         " vs " + std::to_string(values.numel()));
  if (defv.numel() < 1 || defv.dtype() != values.dtype())
    return ctx.bad_input("default value must be one element of the values' type");
  if ((keys.dtype() == DataType::kString) != (x->dtype() == DataType::kString))
    return ctx.bad_input("input type " + x->describe() + " does not match key type " +
                         dtype_name(keys.dtype()));
  std::map<Key, int64_t> table;
  for (int64_t i = 0; i < keys.numel(); ++i) table.emplace(key_at(keys, i), i);
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(values.dtype(), x->shape()));
  for (int64_t i = 0; i < x->numel(); ++i) {
    auto it = table.find(key_at(*x, i));
    if (it == table.end())
      ctl::copy_elems(defv, 0, y, i, 1);
    else
      ctl::copy_elems(values, it->second, y, i, 1);
  }
  out[0] = std::move(y);
  return Status::ok();
}

// ---------------------------------------------------------------- ArrayFeatureExtractor
Status eval_array_feature_extractor(OpContext& ctx, std::span<const Value> in,
                                    std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* y, req_tensor(ctx, in, 1));
  if (!is_integer(y->dtype()))
    return ctx.bad_input("indices must be integers, got " + y->describe());
  if (x->rank() < 1) return ctx.bad_input("input must have rank >= 1");
  const std::vector<int64_t> idx = y->to_i64_vector();
  const int64_t last = x->dim(x->rank() - 1);
  for (int64_t v : idx)
    if (v < 0 || v >= last)
      return ctx.bad_input("index " + std::to_string(v) + " out of range for last dim " +
                           std::to_string(last));
  const int64_t k = static_cast<int64_t>(idx.size());
  Shape os;
  if (x->rank() == 1)
    os = {1, k};
  else {
    os.assign(x->shape().begin(), x->shape().end() - 1);
    os.push_back(k);
  }
  KILN_ASSIGN_OR_RETURN(Tensor o, Tensor::create(x->dtype(), os));
  const int64_t rows = last == 0 ? 0 : x->numel() / last;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < k; ++j)
      ctl::copy_elems(*x, r * last + idx[static_cast<size_t>(j)], o, r * k + j, 1);
  out[0] = std::move(o);
  return Status::ok();
}

// ---------------------------------------------------------------- Binarizer
Status eval_binarizer(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const double th = ctx.node.attr_float("threshold", 0.0f);
  KILN_ASSIGN_OR_RETURN(Tensor y, Tensor::create(x->dtype(), x->shape()));
  bool ok = dispatch_numeric(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x->data<T>();
    T* py = y.data<T>();
    for (int64_t i = 0; i < x->numel(); ++i)
      py[i] = static_cast<double>(static_cast<compute_t<T>>(px[i])) > th ? T(1) : T(0);
  });
  if (!ok) return ctx.bad_input("unsupported input type " + x->describe());
  out[0] = std::move(y);
  return Status::ok();
}

// ---------------------------------------------------------------- TreeEnsemble
std::vector<double> tensor_attr_f64(const Node& n, const char* name) {
  std::vector<double> v;
  if (const Tensor* t = n.attr_tensor(name))
    for (int64_t i = 0; i < t->numel(); ++i) v.push_back(t->get_f64(i));
  return v;
}

Status eval_tree_ensemble(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const Node& n = ctx.node;
  if (!is_float(x->dtype()) || x->rank() > 2 || x->rank() < 1)
    return ctx.bad_input("input must be a float [N,F] tensor, got " + x->describe());
  const int64_t rows = x->rank() == 2 ? x->dim(0) : 1;
  const int64_t feats = x->rank() == 2 ? x->dim(1) : x->dim(0);
  const std::vector<double> splits = tensor_attr_f64(n, "nodes_splits");
  const std::vector<double> modes_d = tensor_attr_f64(n, "nodes_modes");
  const std::vector<double> leaf_w = tensor_attr_f64(n, "leaf_weights");
  const std::vector<double> members = tensor_attr_f64(n, "membership_values");
  const auto feat = n.attr_ints("nodes_featureids");
  const auto tid = n.attr_ints("nodes_truenodeids"), fid = n.attr_ints("nodes_falsenodeids");
  const auto tleaf = n.attr_ints("nodes_trueleafs"), fleaf = n.attr_ints("nodes_falseleafs");
  const auto leaf_t = n.attr_ints("leaf_targetids");
  const auto roots = n.attr_ints("tree_roots");
  const auto mtt = n.attr_ints("nodes_missing_value_tracks_true");
  const int64_t n_targets = n.attr_int("n_targets", -1);
  const int64_t agg = n.attr_int("aggregate_function", 1);
  const int64_t post = n.attr_int("post_transform", 0);
  const size_t nn = splits.size();
  if (feat.size() != nn || modes_d.size() != nn || tid.size() != nn || fid.size() != nn ||
      tleaf.size() != nn || fleaf.size() != nn || (!mtt.empty() && mtt.size() != nn))
    return ctx.bad_input("nodes_* attributes differ in length");
  if (leaf_t.size() != leaf_w.size())
    return ctx.bad_input("leaf_targetids and leaf_weights differ in length");
  if (n_targets < 1) return ctx.bad_input("n_targets must be positive");
  if (agg < 0 || agg > 3) return ctx.bad_input("invalid aggregate_function");
  for (size_t i = 0; i < nn; ++i) {
    if (feat[i] < 0 || feat[i] >= feats) return ctx.bad_input("feature id out of range");
    auto check = [&](int64_t id, int64_t leaf) {
      return id >= 0 &&
             (leaf ? id < static_cast<int64_t>(leaf_w.size()) : id < static_cast<int64_t>(nn));
    };
    if (!check(tid[i], tleaf[i]) || !check(fid[i], fleaf[i]))
      return ctx.bad_input("node/leaf id out of range");
    if (modes_d[i] < 0 || modes_d[i] > 6) return ctx.bad_input("invalid node mode");
  }
  for (int64_t t : leaf_t)
    if (t < 0 || t >= n_targets) return ctx.bad_input("leaf target id out of range");
  // Set-membership lists: one NaN-terminated run per MEMBER node, in node order.
  std::vector<std::vector<double>> sets(nn);
  size_t mp = 0;
  for (size_t i = 0; i < nn; ++i) {
    if (modes_d[i] != 6) continue;
    if (mp >= members.size())
      return ctx.bad_input("membership_values has fewer sets than member nodes");
    while (mp < members.size() && !std::isnan(members[mp])) sets[i].push_back(members[mp++]);
    ++mp;  // the NaN terminator
  }
  KILN_ASSIGN_OR_RETURN(Tensor xf, cast_tensor(*x, DataType::kDouble));
  const double* px = xf.data<double>();
  const double init = agg == 2   ? std::numeric_limits<double>::max()
                      : agg == 3 ? std::numeric_limits<double>::lowest()
                                 : 0.0;
  KILN_ASSIGN_OR_RETURN(Tensor rt, Tensor::create(DataType::kDouble, {rows, n_targets}));
  double* res = rt.data<double>();
  std::fill(res, res + rt.numel(), init);
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = px + r * feats;
    double* acc = res + r * n_targets;
    for (int64_t root : roots) {
      if (root < 0 || root >= static_cast<int64_t>(nn))
        return ctx.bad_input("tree root out of range");
      int64_t leaf = -1, cur = root;
      const size_t ur = static_cast<size_t>(root);
      if (tleaf[ur] && fleaf[ur] && tid[ur] == fid[ur]) leaf = tid[ur];
      for (size_t steps = 0; leaf < 0; ++steps) {
        if (steps > nn) return ctx.bad_input("tree has a cycle");
        const size_t c = static_cast<size_t>(cur);
        const double v = row[feat[c]], s = splits[c];
        bool go;
        switch (static_cast<int>(modes_d[c])) {
          case 0:
            go = v <= s;
            break;
          case 1:
            go = v < s;
            break;
          case 2:
            go = v >= s;
            break;
          case 3:
            go = v > s;
            break;
          case 4:
            go = v == s;
            break;
          case 5:
            go = v != s;
            break;
          default:
            go = std::find(sets[c].begin(), sets[c].end(), v) != sets[c].end();
            break;
        }
        if (!mtt.empty() && mtt[c] && std::isnan(v)) go = true;
        const int64_t next = go ? tid[c] : fid[c];
        if (go ? tleaf[c] : fleaf[c])
          leaf = next;
        else
          cur = next;
      }
      const size_t l = static_cast<size_t>(leaf);
      double& a = acc[leaf_t[l]];
      const double w = leaf_w[l];
      if (agg == 0)
        a += w / static_cast<double>(roots.size());
      else if (agg == 1)
        a += w;
      else if (agg == 2)
        a = std::min(a, w);
      else
        a = std::max(a, w);
    }
    // Post transforms as ONNX Runtime applies them.
    if (post == 1 || post == 3) {
      double mx = acc[0];
      for (int64_t t = 1; t < n_targets; ++t) mx = std::max(mx, acc[t]);
      double sum = 0;
      for (int64_t t = 0; t < n_targets; ++t) {
        acc[t] = (post == 3 && acc[t] == 0) ? 0 : std::exp(acc[t] - mx);
        sum += acc[t];
      }
      for (int64_t t = 0; t < n_targets; ++t) acc[t] = sum > 0 ? acc[t] / sum : 0;
    } else if (post == 2) {
      for (int64_t t = 0; t < n_targets; ++t) acc[t] = 1.0 / (1.0 + std::exp(-acc[t]));
    } else if (post == 4) {
      for (int64_t t = 0; t < n_targets; ++t) acc[t] = std::sqrt(2.0) * std::erf(2 * acc[t] - 1);
    }
  }
  KILN_ASSIGN_OR_RETURN(Tensor y, cast_tensor(rt, x->dtype()));
  out[0] = std::move(y);
  return Status::ok();
}

// Type inference.
Status infer_label_encoder(InferContext& ctx) {
  const Node& n = ctx.node;
  DataType dt = DataType::kUndefined;
  if (const Tensor* t = n.attr_tensor("values_tensor"))
    dt = t->dtype();
  else if (n.has_attr("values_strings"))
    dt = DataType::kString;
  else if (n.has_attr("values_int64s"))
    dt = DataType::kInt64;
  else if (n.has_attr("values_floats"))
    dt = DataType::kFloat;
  if (dt != DataType::kUndefined) ctx.output_types[0] = ctl::like_input(ctx, 0, dt);
  return Status::ok();
}
Status infer_same_as_input(InferContext& ctx) {
  if (ctl::input_is_tensor(ctx, 0))
    ctx.output_types[0] = ctl::like_input(ctx, 0, ctx.input_types[0].dtype);
  return Status::ok();
}
Status infer_input_dtype(InferContext& ctx) {
  if (ctl::input_is_tensor(ctx, 0))
    ctx.output_types[0] = TypeInfo::tensor(ctx.input_types[0].dtype);
  return Status::ok();
}
Status infer_tree_ensemble(InferContext& ctx) {
  if (!ctl::input_is_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  TypeInfo y = TypeInfo::tensor(x.dtype);
  const int64_t nt = ctx.node.attr_int("n_targets", -1);
  if (x.has_shape && x.dims.size() == 2 && nt > 0) {
    y.has_shape = true;
    y.dims = {x.dims[0], Dim::of(nt)};
  }
  ctx.output_types[0] = y;
  return Status::ok();
}

}  // namespace

const OpDef kOp_ml_LabelEncoder = {"LabelEncoder", "ai.onnx.ml", &eval_label_encoder,
                                   &infer_label_encoder};
const OpDef kOp_ml_ArrayFeatureExtractor = {"ArrayFeatureExtractor", "ai.onnx.ml",
                                            &eval_array_feature_extractor, &infer_input_dtype};
const OpDef kOp_ml_Binarizer = {"Binarizer", "ai.onnx.ml", &eval_binarizer, &infer_same_as_input};
const OpDef kOp_ml_TreeEnsemble = {"TreeEnsemble", "ai.onnx.ml", &eval_tree_ensemble,
                                   &infer_tree_ensemble};

}  // namespace kiln
