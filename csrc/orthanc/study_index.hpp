// The Orthanc plugin's persistent study index: Orthanc study id -> one embedding, searchable.
//
// On disk (IndexDirectory), generation g:
//   studies.ids        the commit point: generation g, dimension, engine fingerprint, next id, and
//                      every study (core id, study id, frontal / lateral instance ids, vector),
//                      ending with a CRC-32C of all that precedes it
//   index-<g>.clvx     the core index (clinvla_index_save) of the same vectors, for fast loading
//   log-<g>.bin        append-only log of what changed since: put {id, study, instances, vector}
//                      and remove {id, study}; each record is [u32 length][u32 CRC-32C][payload]
//                      and is fsynced before put() / remove() return ("acknowledged")
// Start-up: load studies.ids and index-<g>.clvx (rebuilt from studies.ids when missing or damaged),
// then replay log-<g>.bin up to the first torn or corrupt record, which is cut off: only a record
// whose write never completed can be lost, and that one was never acknowledged.
// Every `snapshot_every` log records a snapshot writes index-<g+1>.clvx and studies.ids (each to a
// unique temporary name, renamed into place; the rename of studies.ids is the commit), then starts
// log-<g+1>.bin and deletes generation g's files. A crash at any step leaves one complete generation.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "clinvla/clinvla.h"

namespace clinvla_orthanc {

// A failure that names the file and the fix.
class IndexError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct StudyEntry {
  int64_t id = -1;            // id in the core index
  std::string frontal;        // Orthanc instance id of the frontal view
  std::string lateral;        // "" when the study has no lateral view
  std::vector<float> vector;  // (dim) float32, L2-normalised
};

struct Hit {
  std::string study;
  float score = 0.f;
  std::string frontal;
  std::string lateral;
};

struct IndexStats {
  int64_t studies = 0;
  int64_t log_records = 0;        // records in the current log (since the last snapshot)
  uint64_t generation = 0;
  int64_t replayed_records = 0;   // at start-up
  int64_t dropped_tail_bytes = 0; // torn / corrupt log tail cut off at start-up
  int64_t snapshots = 0;          // written by this process
};

class StudyIndex {
 public:
  using Logger = std::function<void(const std::string&)>;

  // Opens (creating it when absent) `directory` for vectors of `dim` floats made by the engine
  // identified by `fingerprint`; an index made by another engine or of another dimension is
  // refused (IndexError naming the directory and the fix). `warn` receives recoveries (a cut log
  // tail, a rebuilt core index file).
  StudyIndex(std::string directory, int64_t dim, std::string fingerprint, int64_t snapshot_every,
             Logger warn);
  ~StudyIndex();
  StudyIndex(const StudyIndex&) = delete;
  StudyIndex& operator=(const StudyIndex&) = delete;

  // Adds or replaces a study; durable (fsynced) when it returns. vector: (dim) finite floats.
  void put(const std::string& study, const std::string& frontal, const std::string& lateral,
           const float* vector);
  // Removes a study; durable when it returns. false: the study was not indexed.
  bool remove(const std::string& study);
  // Top k studies by inner product with query (dim floats), best first; `exclude` left out.
  std::vector<Hit> search(const float* query, int64_t k, const std::string& exclude = std::string()) const;
  bool get(const std::string& study, StudyEntry* out) const;
  bool contains(const std::string& study) const;
  std::vector<std::string> studies() const;
  int64_t size() const;
  int64_t dim() const { return dim_; }
  IndexStats stats() const;
  // Writes a snapshot now and starts a new log (also done every snapshot_every records).
  void snapshot();

 private:
  void load();
  void replay_log();
  void open_log_for_append(int64_t valid_bytes);
  void append(const std::vector<uint8_t>& payload);
  void apply_put(int64_t id, const std::string& study, const std::string& frontal,
                 const std::string& lateral, const float* vector);
  bool apply_remove(const std::string& study);
  void snapshot_locked();
  void rebuild_core();
  std::string path(const std::string& name) const;
  std::string log_name(uint64_t generation) const;
  std::string core_name(uint64_t generation) const;

  std::string dir_;
  int64_t dim_;
  std::string fingerprint_;
  int64_t snapshot_every_;
  Logger warn_;

  mutable std::shared_mutex mu_;
  clinvla_index* core_ = nullptr;
  std::unordered_map<std::string, StudyEntry> entries_;
  std::unordered_map<int64_t, std::string> by_id_;
  int64_t next_id_ = 0;
  uint64_t generation_ = 0;
  int log_fd_ = -1;
  int lock_fd_ = -1;
  int64_t log_bytes_ = 0;
  bool broken_ = false;  // a failed write could not be undone: refuse further writes
  IndexStats stats_;
};

}  // namespace clinvla_orthanc
