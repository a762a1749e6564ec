#include "views.hpp"

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include <nlohmann/json.hpp>

namespace clinvla_orthanc {

PickRanks load_pick_ranks(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open the view rules '" + path + "' (set ClinVLA.ViewRules to "
                                    "clinvla_engine/data/view_rules.json of the installed package)");
  std::stringstream text;
  text << in.rdbuf();
  PickRanks ranks;
  try {
    const auto rules = nlohmann::json::parse(text.str());
    const auto& pick = rules.at("pick");
    for (const auto& kv : pick.at("frontal_rank").items()) ranks.frontal[kv.key()] = kv.value().get<int>();
    for (const auto& kv : pick.at("lateral_rank").items()) ranks.lateral[kv.key()] = kv.value().get<int>();
    ranks.modalities = rules.at("modalities").at("allowed").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("the view rules '" + path + "' have no usable \"pick\" ranks: " + e.what());
  }
  if (ranks.frontal.empty() || ranks.lateral.empty())
    throw std::runtime_error("the view rules '" + path + "' have empty \"pick\" ranks");
  return ranks;
}

bool PickRanks::modality_allowed(const std::string& modality) const {
  for (const auto& m : modalities)
    if (m == modality) return true;
  return false;
}

std::pair<int, int> pick_views(const std::vector<Candidate>& candidates, const PickRanks& ranks) {
  using Key = std::tuple<int, int64_t, bool, int64_t, std::string, int>;
  int best[3] = {-1, -1, -1};
  Key best_key[3];
  for (int i = 0; i < int(candidates.size()); ++i) {
    const Candidate& c = candidates[size_t(i)];
    if (c.view != 1 && c.view != 2) continue;
    const auto& table = c.view == 1 ? ranks.frontal : ranks.lateral;
    const auto r = table.find(c.label);
    const int rank = r == table.end() ? int(table.size()) : r->second;
    Key key{rank, -c.pixels, !c.has_number, c.has_number ? c.number : 0, c.path, i};
    if (best[c.view] < 0 || key < best_key[c.view]) {
      best[c.view] = i;
      best_key[c.view] = key;
    }
  }
  return {best[1], best[2]};
}

}  // namespace clinvla_orthanc
