#include "onnx/proto.h"

namespace kiln::onnx {

using wire::Field;
using wire::Reader;

std::string normalize_domain(const std::string& d) {
  return d == "ai.onnx" ? std::string() : d;
}

namespace {

Status depth_error(const Reader& r, const Field& f) {
  return r.err(f, "message nesting deeper than " + std::to_string(wire::kMaxDepth) + " levels");
}

Status parse_string_pair(Reader r, std::pair<std::string, std::string>& kv) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 1)
      KILN_RETURN_IF_ERROR(r.str(f, kv.first));
    else if (f.num == 2)
      KILN_RETURN_IF_ERROR(r.str(f, kv.second));
  }
  return Status::ok();
}

Status parse_opset(Reader r, OpsetMap& m) {
  Field f;
  std::string domain;
  int64_t version = 0;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 1)
      KILN_RETURN_IF_ERROR(r.str(f, domain));
    else if (f.num == 2)
      KILN_RETURN_IF_ERROR(r.i64(f, version));
  }
  m[normalize_domain(domain)] = version;
  return Status::ok();
}

Status parse_dim(Reader r, Dim& d) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 1) {
      int64_t v;
      KILN_RETURN_IF_ERROR(r.i64(f, v));
      if (v < 0) return r.err(f, "negative dimension " + std::to_string(v));
      d.value = v;
      d.param.clear();
    } else if (f.num == 2) {
      KILN_RETURN_IF_ERROR(r.str(f, d.param));
      d.value = -1;
    }
  }
  return Status::ok();
}

Status parse_tensor_type(Reader r, TypeInfo& t) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 1) {
      int64_t e;
      KILN_RETURN_IF_ERROR(r.i64(f, e));
      if (e < 0 || e > kMaxDataType) return r.err(f, "invalid element type " + std::to_string(e));
      t.dtype = static_cast<DataType>(e);
    } else if (f.num == 2) {
      KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
      t.has_shape = true;
      t.dims.clear();
      Reader s = r.sub(f, "TensorShapeProto");
      Field g;
      while (!s.done()) {
        KILN_RETURN_IF_ERROR(s.next(g));
        if (g.num != 1) continue;
        KILN_RETURN_IF_ERROR(s.expect(g, wire::kLen));
        Dim d;
        KILN_RETURN_IF_ERROR(parse_dim(s.sub(g, "TensorShapeProto.Dimension"), d));
        t.dims.push_back(std::move(d));
      }
    }
  }
  return Status::ok();
}

// TypeProto.Sequence / Optional / Map: element type(s) in nested TypeProtos.
Status parse_elem_type(Reader r, TypeInfo& t, uint32_t field, int depth) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num != field) continue;
    KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
    auto e = std::make_shared<TypeInfo>();
    KILN_RETURN_IF_ERROR(parse_type(r.sub(f, "TypeProto"), *e, depth + 1));
    t.elem = std::move(e);
  }
  return Status::ok();
}

Status parse_value_info(Reader r, ValueInfoMsg& v, int depth) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 1)
      KILN_RETURN_IF_ERROR(r.str(f, v.name));
    else if (f.num == 2) {
      KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
      KILN_RETURN_IF_ERROR(parse_type(r.sub(f, "TypeProto"), v.type, depth + 1));
    }
  }
  return Status::ok();
}

Status parse_graph(Reader r, GraphMsg& g, int depth);

Status parse_attr(Reader r, AttrMsg& a, int depth) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (depth > wire::kMaxDepth) return depth_error(r, f);
    switch (f.num) {
      case 1:
        KILN_RETURN_IF_ERROR(r.str(f, a.name));
        break;
      case 2: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kFixed32));
        std::vector<float> v;
        KILN_RETURN_IF_ERROR(r.fixed32s(f, v));
        a.f = v[0];
        a.has_f = true;
        break;
      }
      case 3:
        KILN_RETURN_IF_ERROR(r.i64(f, a.i));
        a.has_i = true;
        break;
      case 4:
        KILN_RETURN_IF_ERROR(r.str(f, a.s));
        a.has_s = true;
        break;
      case 5:
      case 10: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        TensorMsg t;
        KILN_RETURN_IF_ERROR(parse_tensor(r.sub(f, "TensorProto"), t));
        if (f.num == 5) {
          a.has_t = true;
          a.tensors.insert(a.tensors.begin(), std::move(t));
        } else {
          a.tensors.push_back(std::move(t));
        }
        break;
      }
      case 6:
      case 11: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        auto g = std::make_shared<GraphMsg>();
        KILN_RETURN_IF_ERROR(parse_graph(r.sub(f, "GraphProto"), *g, depth + 1));
        if (f.num == 6) {
          a.has_g = true;
          a.graphs.insert(a.graphs.begin(), std::move(g));
        } else {
          a.graphs.push_back(std::move(g));
        }
        break;
      }
      case 7:
        KILN_RETURN_IF_ERROR(r.fixed32s(f, a.floats));
        break;
      case 8:
        KILN_RETURN_IF_ERROR(r.varints(f, a.ints));
        break;
      case 9: {
        std::string s;
        KILN_RETURN_IF_ERROR(r.str(f, s));
        a.strings.push_back(std::move(s));
        break;
      }
      case 14:
      case 15: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        TypeInfo t;
        KILN_RETURN_IF_ERROR(parse_type(r.sub(f, "TypeProto"), t, depth + 1));
        if (f.num == 14) {
          a.has_tp = true;
          a.types.insert(a.types.begin(), std::move(t));
        } else {
          a.types.push_back(std::move(t));
        }
        break;
      }
      case 20: {
        int64_t t;
        KILN_RETURN_IF_ERROR(r.i64(f, t));
        if (t < 0 || t > 14) return r.err(f, "invalid attribute type " + std::to_string(t));
        a.type = static_cast<int32_t>(t);
        break;
      }
      case 21:
        KILN_RETURN_IF_ERROR(r.str(f, a.ref_attr_name));
        break;
      case 22:
      case 23: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        SparseTensorMsg s;
        KILN_RETURN_IF_ERROR(parse_sparse(r.sub(f, "SparseTensorProto"), s));
        if (f.num == 22) {
          a.has_sparse = true;
          a.sparse.insert(a.sparse.begin(), std::move(s));
        } else {
          a.sparse.push_back(std::move(s));
        }
        break;
      }
      default:
        break;
    }
  }
  return Status::ok();
}

Status parse_node(Reader r, NodeMsg& n, int depth) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (depth > wire::kMaxDepth) return depth_error(r, f);
    switch (f.num) {
      case 1:
        n.inputs.emplace_back();
        KILN_RETURN_IF_ERROR(r.str(f, n.inputs.back()));
        break;
      case 2:
        n.outputs.emplace_back();
        KILN_RETURN_IF_ERROR(r.str(f, n.outputs.back()));
        break;
      case 3:
        KILN_RETURN_IF_ERROR(r.str(f, n.name));
        break;
      case 4:
        KILN_RETURN_IF_ERROR(r.str(f, n.op_type));
        break;
      case 5: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        AttrMsg a;
        a.off = f.off;
        KILN_RETURN_IF_ERROR(parse_attr(r.sub(f, "AttributeProto"), a, depth + 1));
        n.attrs.push_back(std::move(a));
        break;
      }
      case 7:
        KILN_RETURN_IF_ERROR(r.str(f, n.domain));
        break;
      case 8:
        KILN_RETURN_IF_ERROR(r.str(f, n.overload));
        break;
      default:
        break;
    }
  }
  n.domain = normalize_domain(n.domain);
  return Status::ok();
}

Status parse_graph(Reader r, GraphMsg& g, int depth) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (depth > wire::kMaxDepth) return depth_error(r, f);
    switch (f.num) {
      case 1: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        NodeMsg n;
        n.off = f.off;
        KILN_RETURN_IF_ERROR(parse_node(r.sub(f, "NodeProto"), n, depth + 1));
        g.nodes.push_back(std::move(n));
        break;
      }
      case 2:
        KILN_RETURN_IF_ERROR(r.str(f, g.name));
        break;
      case 5: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        TensorMsg t;
        KILN_RETURN_IF_ERROR(parse_tensor(r.sub(f, "TensorProto"), t));
        g.initializers.push_back(std::move(t));
        break;
      }
      case 11:
      case 12:
      case 13: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        ValueInfoMsg v;
        KILN_RETURN_IF_ERROR(parse_value_info(r.sub(f, "ValueInfoProto"), v, depth + 1));
        (f.num == 11 ? g.inputs : f.num == 12 ? g.outputs : g.value_info).push_back(std::move(v));
        break;
      }
      case 15: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        SparseTensorMsg s;
        KILN_RETURN_IF_ERROR(parse_sparse(r.sub(f, "SparseTensorProto"), s));
        g.sparse_initializers.push_back(std::move(s));
        break;
      }
      default:
        break;
    }
  }
  return Status::ok();
}

Status parse_function(Reader r, FunctionMsg& fn) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    switch (f.num) {
      case 1:
        KILN_RETURN_IF_ERROR(r.str(f, fn.name));
        break;
      case 4:
        fn.inputs.emplace_back();
        KILN_RETURN_IF_ERROR(r.str(f, fn.inputs.back()));
        break;
      case 5:
        fn.outputs.emplace_back();
        KILN_RETURN_IF_ERROR(r.str(f, fn.outputs.back()));
        break;
      case 6:
        fn.attribute_names.emplace_back();
        KILN_RETURN_IF_ERROR(r.str(f, fn.attribute_names.back()));
        break;
      case 7: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        NodeMsg n;
        n.off = f.off;
        KILN_RETURN_IF_ERROR(parse_node(r.sub(f, "NodeProto"), n, 2));
        fn.nodes.push_back(std::move(n));
        break;
      }
      case 9:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        KILN_RETURN_IF_ERROR(parse_opset(r.sub(f, "OperatorSetIdProto"), fn.opsets));
        break;
      case 10:
        KILN_RETURN_IF_ERROR(r.str(f, fn.domain));
        break;
      case 11: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        AttrMsg a;
        a.off = f.off;
        KILN_RETURN_IF_ERROR(parse_attr(r.sub(f, "AttributeProto"), a, 2));
        fn.attribute_defaults.push_back(std::move(a));
        break;
      }
      case 13:
        KILN_RETURN_IF_ERROR(r.str(f, fn.overload));
        break;
      default:
        break;
    }
  }
  fn.domain = normalize_domain(fn.domain);
  return Status::ok();
}

}  // namespace

Status parse_type(Reader r, TypeInfo& t, int depth) {
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (depth > wire::kMaxDepth) return depth_error(r, f);
    switch (f.num) {
      case 1:
      case 8:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        t.kind = TypeInfo::Kind::kTensor;
        KILN_RETURN_IF_ERROR(parse_tensor_type(r.sub(f, "TypeProto.Tensor"), t));
        break;
      case 4:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        t.kind = TypeInfo::Kind::kSequence;
        KILN_RETURN_IF_ERROR(parse_elem_type(r.sub(f, "TypeProto.Sequence"), t, 1, depth));
        break;
      case 5:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        t.kind = TypeInfo::Kind::kMap;
        KILN_RETURN_IF_ERROR(parse_elem_type(r.sub(f, "TypeProto.Map"), t, 2, depth));
        break;
      case 9:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        t.kind = TypeInfo::Kind::kOptional;
        KILN_RETURN_IF_ERROR(parse_elem_type(r.sub(f, "TypeProto.Optional"), t, 1, depth));
        break;
      default:
        break;
    }
  }
  return Status::ok();
}

Status parse_tensor(Reader r, TensorMsg& t) {
  Field f;
  t.off = r.begin();
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    switch (f.num) {
      case 1: {
        std::vector<uint64_t> d;
        KILN_RETURN_IF_ERROR(r.varints(f, d));
        for (uint64_t v : d) {
          int64_t x = static_cast<int64_t>(v);
          if (x < 0) return r.err(f, "negative dimension " + std::to_string(x));
          t.dims.push_back(x);
        }
        break;
      }
      case 2: {
        int64_t v;
        KILN_RETURN_IF_ERROR(r.i64(f, v));
        if (v <= 0 || v > kMaxDataType || !dtype_valid(static_cast<int32_t>(v)))
          return r.err(f, "invalid data_type " + std::to_string(v));
        t.data_type = static_cast<int32_t>(v);
        break;
      }
      case 3:
        return r.err(f, "segmented tensors are not supported");
      case 4:
        KILN_RETURN_IF_ERROR(r.fixed32s(f, t.float_data));
        break;
      case 5:
        KILN_RETURN_IF_ERROR(r.varints(f, t.int32_data));
        break;
      case 6:
        t.string_data.emplace_back();
        KILN_RETURN_IF_ERROR(r.str(f, t.string_data.back()));
        break;
      case 7:
        KILN_RETURN_IF_ERROR(r.varints(f, t.int64_data));
        break;
      case 8:
        KILN_RETURN_IF_ERROR(r.str(f, t.name));
        break;
      case 9:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        t.has_raw = true;
        t.raw_start = f.start;
        t.raw_len = f.len;
        break;
      case 10:
        KILN_RETURN_IF_ERROR(r.fixed64s(f, t.double_data));
        break;
      case 11:
        KILN_RETURN_IF_ERROR(r.varints(f, t.uint64_data));
        break;
      case 13: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        std::pair<std::string, std::string> kv;
        KILN_RETURN_IF_ERROR(parse_string_pair(r.sub(f, "StringStringEntryProto"), kv));
        t.external_data.push_back(std::move(kv));
        break;
      }
      case 14: {
        int64_t v;
        KILN_RETURN_IF_ERROR(r.i64(f, v));
        if (v != 0 && v != 1) return r.err(f, "invalid data_location " + std::to_string(v));
        t.data_location = static_cast<int32_t>(v);
        break;
      }
      default:
        break;
    }
  }
  return Status::ok();
}

Status parse_sparse(Reader r, SparseTensorMsg& s) {
  Field f;
  s.off = r.begin();
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 1 || f.num == 2) {
      KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
      KILN_RETURN_IF_ERROR(
          parse_tensor(r.sub(f, "TensorProto"), f.num == 1 ? s.values : s.indices));
    } else if (f.num == 3) {
      std::vector<uint64_t> d;
      KILN_RETURN_IF_ERROR(r.varints(f, d));
      for (uint64_t v : d) {
        int64_t x = static_cast<int64_t>(v);
        if (x < 0) return r.err(f, "negative dimension " + std::to_string(x));
        s.dims.push_back(x);
      }
    }
  }
  return Status::ok();
}

Status parse_model(const uint8_t* base, size_t size, ModelMsg& m) {
  Reader r(base, 0, size, "ModelProto");
  Field f;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    switch (f.num) {
      case 1:
        KILN_RETURN_IF_ERROR(r.i64(f, m.ir_version));
        break;
      case 2:
        KILN_RETURN_IF_ERROR(r.str(f, m.producer_name));
        break;
      case 3:
        KILN_RETURN_IF_ERROR(r.str(f, m.producer_version));
        break;
      case 4:
        KILN_RETURN_IF_ERROR(r.str(f, m.domain));
        break;
      case 5:
        KILN_RETURN_IF_ERROR(r.i64(f, m.model_version));
        break;
      case 6:
        KILN_RETURN_IF_ERROR(r.str(f, m.doc_string));
        break;
      case 7:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        m.has_graph = true;
        m.graph = GraphMsg{};
        KILN_RETURN_IF_ERROR(parse_graph(r.sub(f, "GraphProto"), m.graph, 1));
        break;
      case 8:
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        KILN_RETURN_IF_ERROR(parse_opset(r.sub(f, "OperatorSetIdProto"), m.opsets));
        break;
      case 14: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        std::pair<std::string, std::string> kv;
        KILN_RETURN_IF_ERROR(parse_string_pair(r.sub(f, "StringStringEntryProto"), kv));
        m.metadata.push_back(std::move(kv));
        break;
      }
      case 25: {
        KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
        FunctionMsg fn;
        KILN_RETURN_IF_ERROR(parse_function(r.sub(f, "FunctionProto"), fn));
        m.functions.push_back(std::move(fn));
        break;
      }
      default:
        break;
    }
  }
  if (!m.has_graph) return invalid_model("ModelProto has no graph (field 7)");
  return Status::ok();
}

}  // namespace kiln::onnx
