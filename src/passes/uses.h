// Who reads each value of a graph, shared by the graph passes that fold one node into another.
#pragma once

#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "ir/graph.h"

namespace kiln {

// Who reads each value: node indices (a node reading a value twice counts twice), plus graph
// outputs and subgraph captures, which pin a value (it must keep its name).
struct Uses {
  std::unordered_map<std::string, int> count;
  std::unordered_set<std::string> pinned;
  std::unordered_map<std::string, size_t> producer;

  explicit Uses(const Graph& g) {
    for (auto& o : g.outputs) pinned.insert(o.name);
    for (size_t i = 0; i < g.nodes.size(); ++i) {
      const Node& n = g.nodes[i];
      for (auto& in : n.inputs)
        if (!in.empty()) count[in]++;
      for (auto& o : n.outputs)
        if (!o.empty()) producer[o] = i;
      for (auto& a : n.attrs) {
        std::vector<const Graph*> subs;
        if (a.g) subs.push_back(a.g.get());
        for (auto& sg : a.graphs) subs.push_back(sg.get());
        for (auto* s : subs) {
          std::unordered_set<std::string> refs;
          collect_outer_refs(*s, refs);
          pinned.insert(refs.begin(), refs.end());
        }
      }
    }
  }
  // The value is read by exactly one node and by nothing else.
  bool single_use(const std::string& v) const {
    auto it = count.find(v);
    return it != count.end() && it->second == 1 && !pinned.count(v);
  }
};

}  // namespace kiln
