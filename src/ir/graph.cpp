#include "ir/graph.h"

#include <algorithm>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace kiln {

TypeInfo TypeInfo::tensor(DataType dt, const Shape& s) {
  TypeInfo t = tensor(dt);
  t.has_shape = true;
  for (int64_t d : s) t.dims.push_back(d >= 0 ? Dim::of(d) : Dim{});
  return t;
}

bool TypeInfo::fully_known() const {
  if (kind != Kind::kTensor || !has_shape) return false;
  for (auto& d : dims) if (!d.known()) return false;
  return true;
}

Shape TypeInfo::concrete_shape() const {
  Shape s;
  for (auto& d : dims) s.push_back(d.known() ? d.value : -1);
  return s;
}

std::string TypeInfo::to_string() const {
  switch (kind) {
    case Kind::kUnknown: return "?";
    case Kind::kSequence: return "seq(" + (elem ? elem->to_string() : std::string("?")) + ")";
    case Kind::kOptional: return "optional(" + (elem ? elem->to_string() : std::string("?")) + ")";
    case Kind::kMap: return "map";
    case Kind::kTensor: break;
  }
  std::string r = dtype_name(dtype);
  if (!has_shape) return r + "[?]";
  r += "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) r += ",";
    if (dims[i].known()) r += std::to_string(dims[i].value);
    else if (!dims[i].param.empty()) r += dims[i].param;
    else r += "?";
  }
  return r + "]";
}

const char* attr_kind_name(Attribute::Kind k) {
  switch (k) {
    case Attribute::Kind::kUndefined: return "undefined";
    case Attribute::Kind::kFloat: return "float";
    case Attribute::Kind::kInt: return "int";
    case Attribute::Kind::kString: return "string";
    case Attribute::Kind::kTensor: return "tensor";
    case Attribute::Kind::kGraph: return "graph";
    case Attribute::Kind::kFloats: return "floats";
    case Attribute::Kind::kInts: return "ints";
    case Attribute::Kind::kStrings: return "strings";
    case Attribute::Kind::kTensors: return "tensors";
    case Attribute::Kind::kGraphs: return "graphs";
    case Attribute::Kind::kTypeProto: return "type_proto";
    case Attribute::Kind::kTypeProtos: return "type_protos";
  }
  return "?";
}

const Attribute* Node::attr(std::string_view n) const {
  for (auto& a : attrs) if (a.name == n) return &a;
  return nullptr;
}
Attribute* Node::attr(std::string_view n) {
  for (auto& a : attrs) if (a.name == n) return &a;
  return nullptr;
}
int64_t Node::attr_int(std::string_view n, int64_t def) const {
  auto* a = attr(n);
  if (!a) return def;
  if (a->kind == Attribute::Kind::kFloat) return static_cast<int64_t>(a->f);
  return a->i;
}
float Node::attr_float(std::string_view n, float def) const {
  auto* a = attr(n);
  if (!a) return def;
  if (a->kind == Attribute::Kind::kInt) return static_cast<float>(a->i);
  return a->f;
}
std::string Node::attr_string(std::string_view n, const std::string& def) const {
  auto* a = attr(n);
  return a ? a->s : def;
}
std::vector<int64_t> Node::attr_ints(std::string_view n, std::vector<int64_t> def) const {
  auto* a = attr(n);
  return a ? a->ints : def;
}
std::vector<float> Node::attr_floats(std::string_view n, std::vector<float> def) const {
  auto* a = attr(n);
  return a ? a->floats : def;
}
std::vector<std::string> Node::attr_strings(std::string_view n) const {
  auto* a = attr(n);
  return a ? a->strings : std::vector<std::string>{};
}
const Tensor* Node::attr_tensor(std::string_view n) const {
  auto* a = attr(n);
  return a && a->kind == Attribute::Kind::kTensor ? &a->t : nullptr;
}
const Graph* Node::attr_graph(std::string_view n) const {
  auto* a = attr(n);
  return a && a->kind == Attribute::Kind::kGraph ? a->g.get() : nullptr;
}
void Node::set_attr(Attribute a) {
  for (auto& x : attrs) {
    if (x.name == a.name) { x = std::move(a); return; }
  }
  attrs.push_back(std::move(a));
}
void Node::remove_attr(std::string_view n) {
  attrs.erase(std::remove_if(attrs.begin(), attrs.end(), [&](const Attribute& a) { return a.name == n; }),
              attrs.end());
}

std::string Node::where() const {
  std::string r = "node '" + name + "' (" + (domain.empty() ? "" : domain + ".") + op_type;
  if (opset) r += ", opset " + std::to_string(opset);
  return r + ")";
}

const ValueInfo* Graph::find_value_info(std::string_view n) const {
  for (auto& v : value_info) if (v.name == n) return &v;
  for (auto& v : inputs) if (v.name == n) return &v;
  for (auto& v : outputs) if (v.name == n) return &v;
  return nullptr;
}

// Names a subgraph reads from its enclosing scopes (not defined inside it).
void collect_outer_refs(const Graph& g, std::unordered_set<std::string>& refs) {
  std::unordered_set<std::string> defined;
  for (auto& i : g.inputs) defined.insert(i.name);
  for (auto& [k, v] : g.initializers) defined.insert(k);
  for (auto& n : g.nodes)
    for (auto& o : n.outputs) defined.insert(o);
  for (auto& n : g.nodes) {
    for (auto& i : n.inputs)
      if (!i.empty() && !defined.count(i)) refs.insert(i);
    for (auto& a : n.attrs) {
      std::vector<const Graph*> subs;
      if (a.g) subs.push_back(a.g.get());
      for (auto& gg : a.graphs) subs.push_back(gg.get());
      for (auto* s : subs) {
        std::unordered_set<std::string> inner;
        collect_outer_refs(*s, inner);
        for (auto& r : inner)
          if (!defined.count(r)) refs.insert(r);
      }
    }
  }
  for (auto& o : g.outputs)
    if (!defined.count(o.name)) refs.insert(o.name);
}

Status Graph::topo_sort(const std::vector<std::string>& outer) {
  std::unordered_set<std::string> avail(outer.begin(), outer.end());
  for (auto& i : inputs) avail.insert(i.name);
  for (auto& [k, v] : initializers) avail.insert(k);
  std::unordered_map<std::string, size_t> producer;
  for (size_t i = 0; i < nodes.size(); ++i)
    for (auto& o : nodes[i].outputs)
      if (!o.empty()) producer[o] = i;
  // Each node's dependencies: its inputs plus outer refs of its subgraphs.
  std::vector<std::vector<std::string>> deps(nodes.size());
  for (size_t i = 0; i < nodes.size(); ++i) {
    for (auto& in : nodes[i].inputs)
      if (!in.empty()) deps[i].push_back(in);
    for (auto& a : nodes[i].attrs) {
      std::vector<const Graph*> subs;
      if (a.g) subs.push_back(a.g.get());
      for (auto& gg : a.graphs) subs.push_back(gg.get());
      for (auto* s : subs) {
        std::unordered_set<std::string> refs;
        collect_outer_refs(*s, refs);
        for (auto& r : refs) deps[i].push_back(r);
      }
    }
  }
  std::vector<int> state(nodes.size(), 0);  // 0 new, 1 visiting, 2 done
  std::vector<size_t> order;
  order.reserve(nodes.size());
  // Iterative DFS to avoid deep recursion on long chains.
  for (size_t root = 0; root < nodes.size(); ++root) {
    if (state[root]) continue;
    std::vector<std::pair<size_t, size_t>> stack{{root, 0}};
    state[root] = 1;
    while (!stack.empty()) {
      auto& [n, k] = stack.back();
      if (k < deps[n].size()) {
        const std::string& d = deps[n][k++];
        auto it = producer.find(d);
        if (it == producer.end()) {
          if (!avail.count(d))
            return invalid_model(nodes[n].where() + ": input '" + d +
                                 "' is not a graph input, initializer or output of any node");
          continue;
        }
        size_t p = it->second;
        if (state[p] == 1)
          return invalid_model(nodes[n].where() + ": the graph has a cycle through value '" + d + "'");
        if (state[p] == 0) {
          state[p] = 1;
          stack.push_back({p, 0});
        }
      } else {
        state[n] = 2;
        order.push_back(n);
        stack.pop_back();
      }
    }
  }
  std::vector<Node> sorted;
  sorted.reserve(nodes.size());
  for (size_t i : order) sorted.push_back(std::move(nodes[i]));
  nodes = std::move(sorted);
  return Status::ok();
}

Status verify_graph(const Graph& g, const std::vector<std::string>& outer) {
  std::unordered_set<std::string> defined(outer.begin(), outer.end());
  std::unordered_set<std::string> own;
  auto define = [&](const std::string& n, const std::string& what) -> Status {
    if (n.empty()) return Status::ok();
    if (own.count(n)) return invalid_model("value '" + n + "' is defined more than once (" + what + ")");
    own.insert(n);
    defined.insert(n);
    return Status::ok();
  };
  for (auto& [k, v] : g.initializers) KILN_RETURN_IF_ERROR(define(k, "initializer"));
  for (auto& i : g.inputs) {
    if (g.initializers.count(i.name)) continue;
    KILN_RETURN_IF_ERROR(define(i.name, "graph input"));
  }
  for (auto& n : g.nodes) {
    for (auto& in : n.inputs) {
      if (!in.empty() && !defined.count(in))
        return invalid_model(n.where() + ": input '" + in + "' is not defined before use");
    }
    for (auto& a : n.attrs) {
      std::vector<const Graph*> subs;
      if (a.g) subs.push_back(a.g.get());
      for (auto& gg : a.graphs) subs.push_back(gg.get());
      for (auto* s : subs) {
        std::vector<std::string> vis(defined.begin(), defined.end());
        Status st = verify_graph(*s, vis);
        if (!st.is_ok()) return st.with_context(n.where() + " subgraph '" + a.name + "'");
      }
    }
    for (auto& o : n.outputs) KILN_RETURN_IF_ERROR(define(o, n.where() + " output"));
  }
  for (auto& o : g.outputs)
    if (!defined.count(o.name)) return invalid_model("graph output '" + o.name + "' is never produced");
  return Status::ok();
}

static void print_rec(const Graph& g, int indent, std::ostringstream& os) {
  std::string pad(static_cast<size_t>(indent), ' ');
  os << pad << "graph '" << g.name << "'\n";
  for (auto& i : g.inputs) os << pad << "  input  " << i.name << ": " << i.type.to_string() << "\n";
  for (auto& [k, t] : g.initializers) os << pad << "  weight " << k << ": " << t.describe() << "\n";
  for (auto& n : g.nodes) {
    os << pad << "  ";
    for (size_t i = 0; i < n.outputs.size(); ++i) os << (i ? ", " : "") << n.outputs[i];
    os << " = " << (n.domain.empty() ? "" : n.domain + ".") << n.op_type << "(";
    for (size_t i = 0; i < n.inputs.size(); ++i) os << (i ? ", " : "") << n.inputs[i];
    os << ")";
    if (!n.kernel.empty()) os << "  [" << n.kernel << "]";
    os << "\n";
    for (auto& a : n.attrs) {
      if (a.g) print_rec(*a.g, indent + 4, os);
      for (auto& gg : a.graphs) print_rec(*gg, indent + 4, os);
    }
  }
  for (auto& o : g.outputs) os << pad << "  output " << o.name << ": " << o.type.to_string() << "\n";
}

std::string print_graph(const Graph& g, int indent) {
  std::ostringstream os;
  print_rec(g, indent, os);
  return os.str();
}

int64_t count_parameters(const Graph& g) {
  int64_t n = 0;
  for (auto& [k, t] : g.initializers) n += t.numel();
  for (auto& node : g.nodes)
    for (auto& a : node.attrs) {
      if (a.g) n += count_parameters(*a.g);
      for (auto& gg : a.graphs) n += count_parameters(*gg);
    }
  return n;
}

void op_histogram(const Graph& g, std::map<std::string, int>& hist) {
  for (auto& node : g.nodes) {
    hist[(node.domain.empty() ? "" : node.domain + ".") + node.op_type]++;
    for (auto& a : node.attrs) {
      if (a.g) op_histogram(*a.g, hist);
      for (auto& gg : a.graphs) op_histogram(*gg, hist);
    }
  }
}

}  // namespace kiln
