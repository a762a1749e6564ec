// Which of a study's images are embedded: the "pick" part of view_rules.json (the file Python's
// clinvla_engine.data.views reads), applied to candidates that clinvla_view_classify labelled.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace clinvla_orthanc {

struct Candidate {
  std::string instance;  // Orthanc instance id
  int view = 0;          // clinvla_view: 0 none, 1 frontal, 2 lateral
  std::string label;     // "PA", "AP", "FRONTAL", "LL", ...
  int64_t pixels = 0;    // Rows x Columns
  bool has_number = false;
  int64_t number = 0;    // InstanceNumber
  std::string path;      // the last tie-break (Python: the file path; from Orthanc "instances/{id}")
};

struct PickRanks {
  std::map<std::string, int> frontal;
  std::map<std::string, int> lateral;
  std::vector<std::string> modalities;  // "modalities" {"allowed"}: the only ones classified
  bool modality_allowed(const std::string& modality) const;
};

// Reads "pick" {"frontal_rank", "lateral_rank"} and "modalities" {"allowed"} of a view_rules.json; throws std::runtime_error
// naming the file when it cannot.
PickRanks load_pick_ranks(const std::string& view_rules_path);

// (frontal, lateral) indices into candidates, -1 when absent, as Python's pick_views orders them:
// the label's rank (unranked labels after ranked ones), then most pixels, then lowest
// InstanceNumber (missing last), then smallest path, then input order.
std::pair<int, int> pick_views(const std::vector<Candidate>& candidates, const PickRanks& ranks);

}  // namespace clinvla_orthanc
