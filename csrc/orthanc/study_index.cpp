// See study_index.hpp for the file layout and the crash-safety argument.
#include "study_index.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>

namespace clinvla_orthanc {
namespace {

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the index files are little-endian; this writer stores host order"
#endif

constexpr char kLogMagic[8] = {'C', 'L', 'V', 'L', 'O', 'G', '0', '1'};
constexpr char kIdsMagic[8] = {'C', 'L', 'V', 'I', 'D', 'S', '0', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kLogHeaderBytes = 32;
constexpr uint32_t kMaxPayload = 1u << 24;  // far above any record; a bigger length is garbage
constexpr uint8_t kPut = 1, kRemove = 2;
const char kIdsFile[] = "studies.ids";
const char kLockFile[] = "LOCK";

std::string errno_text() { return std::strerror(errno); }

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw IndexError(s.str());
}

class Writer {
 public:
  std::vector<uint8_t> bytes;
  template <typename T>
  void pod(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof(T));
  }
  void str(const std::string& s) {
    if (s.size() > 0xFFFF) fail("identifier too long (", s.size(), " bytes): '", s.substr(0, 64), "...'");
    pod(uint16_t(s.size()));
    bytes.insert(bytes.end(), s.begin(), s.end());
  }
  void raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    bytes.insert(bytes.end(), b, b + n);
  }
};

// Reads a byte range; ok() turns false (and stays false) on any overrun.
class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  template <typename T>
  T pod() {
    T v{};
    if (!take(sizeof(T))) return v;
    std::memcpy(&v, p_ + pos_ - sizeof(T), sizeof(T));
    return v;
  }
  std::string str() {
    const auto n = pod<uint16_t>();
    if (!take(n)) return std::string();
    return std::string(reinterpret_cast<const char*>(p_ + pos_ - n), n);
  }
  const uint8_t* raw(size_t n) { return take(n) ? p_ + pos_ - n : nullptr; }
  bool ok() const { return ok_; }
  bool done() const { return ok_ && pos_ == n_; }
  size_t pos() const { return pos_; }

 private:
  bool take(size_t n) {
    if (!ok_ || n > n_ - pos_) return ok_ = false;
    pos_ += n;
    return true;
  }
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  bool ok_ = true;
};

void write_all(int fd, const void* data, size_t n, const std::string& what) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("cannot write '", what, "': ", errno_text());
    p += w;
    n -= size_t(w);
  }
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail("cannot open folder '", dir, "' to flush it: ", errno_text());
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  errno = saved;
  if (rc != 0) fail("cannot flush folder '", dir, "': ", errno_text());
}

// false when the file does not exist.
bool read_file(const std::string& path, std::vector<uint8_t>* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    fail("cannot open '", path, "': ", errno_text());
  }
  out->clear();
  uint8_t buf[1 << 16];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const std::string e = errno_text();
      ::close(fd);
      fail("cannot read '", path, "': ", e);
    }
    if (r == 0) break;
    out->insert(out->end(), buf, buf + r);
  }
  ::close(fd);
  return true;
}

// Whole file to a unique temporary name in the same folder, fsynced, renamed into place.
void atomic_write(const std::string& dir, const std::string& path, const std::vector<uint8_t>& bytes) {
  std::string tmp = path + ".tmp-XXXXXX";
  const int fd = ::mkstemp(&tmp[0]);
  if (fd < 0) fail("cannot create a temporary file beside '", path, "': ", errno_text());
  try {
    if (::fchmod(fd, 0644) != 0) fail("cannot set the mode of '", tmp, "': ", errno_text());
    write_all(fd, bytes.data(), bytes.size(), tmp);
    if (::fsync(fd) != 0) fail("cannot flush '", tmp, "': ", errno_text());
    if (::close(fd) != 0) fail("cannot close '", tmp, "': ", errno_text());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string e = errno_text();
    ::unlink(tmp.c_str());
    fail("cannot rename '", tmp, "' to '", path, "': ", e);
  }
  fsync_dir(dir);
}

std::vector<uint8_t> log_header(int64_t dim, uint64_t generation) {
  Writer w;
  w.raw(kLogMagic, 8);
  w.pod(kVersion);
  w.pod(uint32_t(dim));
  w.pod(generation);
  w.pod(uint32_t(0));
  w.pod(clinvla_crc32c(w.bytes.data(), w.bytes.size(), 0));
  return w.bytes;
}

std::string status_text(clinvla_status s) {
  const char* e = clinvla_last_error();
  return std::string(e && *e ? e : "no message") + " (status " + std::to_string(int(s)) + ")";
}

}  // namespace

StudyIndex::StudyIndex(std::string directory, int64_t dim, std::string fingerprint, int64_t snapshot_every,
                       Logger warn)
    : dir_(std::move(directory)), dim_(dim), fingerprint_(std::move(fingerprint)),
      snapshot_every_(snapshot_every), warn_(std::move(warn)) {
  if (dim_ <= 0 || dim_ > (1 << 20)) fail("index dimension must be 1..1048576, got ", dim_);
  if (snapshot_every_ < 1) fail("SnapshotEvery must be >= 1, got ", snapshot_every_);
  if (!warn_) warn_ = [](const std::string&) {};
  if (::mkdir(dir_.c_str(), 0755) != 0 && errno != EEXIST)
    fail("cannot create the index folder '", dir_, "': ", errno_text(), " (check ClinVLA.IndexDirectory)");
  struct stat st {};
  if (::stat(dir_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    fail("the index folder '", dir_, "' is not a folder (check ClinVLA.IndexDirectory)");
  // One writer per folder: a second Orthanc on the same IndexDirectory would interleave logs.
  const std::string lock = path(kLockFile);
  lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd_ < 0) fail("cannot open '", lock, "': ", errno_text());
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd_);
    lock_fd_ = -1;
    fail("the index folder '", dir_, "' is in use by another process (another Orthanc with the same "
         "ClinVLA.IndexDirectory?): give each Orthanc its own folder");
  }
  try {
    load();
  } catch (...) {
    if (core_) clinvla_index_free(core_);
    core_ = nullptr;
    if (log_fd_ >= 0) ::close(log_fd_);
    ::close(lock_fd_);
    throw;
  }
}

StudyIndex::~StudyIndex() {
  if (log_fd_ >= 0) ::close(log_fd_);
  if (core_) clinvla_index_free(core_);
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

std::string StudyIndex::path(const std::string& name) const { return dir_ + "/" + name; }
std::string StudyIndex::log_name(uint64_t g) const { return "log-" + std::to_string(g) + ".bin"; }
std::string StudyIndex::core_name(uint64_t g) const { return "index-" + std::to_string(g) + ".clvx"; }

void StudyIndex::load() {
  std::vector<uint8_t> ids;
  const std::string ids_path = path(kIdsFile);
  if (read_file(ids_path, &ids)) {
    const std::string fix = " (restore it from a backup, or move the folder away so that the plugin "
                            "re-indexes every study)";
    if (ids.size() < 8 + 4 || std::memcmp(ids.data(), kIdsMagic, 8) != 0)
      fail("'", ids_path, "' is not a ClinVLA study map", fix);
    uint32_t stored_crc;
    std::memcpy(&stored_crc, ids.data() + ids.size() - 4, 4);
    if (clinvla_crc32c(ids.data(), ids.size() - 4, 0) != stored_crc)
      fail("'", ids_path, "' is damaged (checksum mismatch)", fix);
    Reader r(ids.data() + 8, ids.size() - 12);
    const auto version = r.pod<uint32_t>();
    const auto dim = r.pod<uint32_t>();
    const auto generation = r.pod<uint64_t>();
    const auto next_id = r.pod<int64_t>();
    const auto count = r.pod<int64_t>();
    const std::string fingerprint = r.str();
    if (!r.ok() || version != kVersion) fail("'", ids_path, "' has an unknown layout (version ", version, ")", fix);
    if (int64_t(dim) != dim_ || fingerprint != fingerprint_)
      fail("the index in '", dir_, "' was made by another engine (", fingerprint, ", ", dim,
           "-d) than the one loaded (", fingerprint_, ", ", dim_, "-d): its vectors cannot be compared; "
           "point ClinVLA.IndexDirectory to a new folder (every study is then re-indexed) or load the "
           "engine that made it");
    generation_ = generation;
    next_id_ = next_id;
    for (int64_t i = 0; i < count && r.ok(); ++i) {
      StudyEntry e;
      e.id = r.pod<int64_t>();
      const std::string study = r.str();
      e.frontal = r.str();
      e.lateral = r.str();
      const uint8_t* v = r.raw(size_t(dim_) * sizeof(float));
      if (!v) break;
      e.vector.resize(size_t(dim_));
      std::memcpy(e.vector.data(), v, size_t(dim_) * sizeof(float));
      by_id_[e.id] = study;
      entries_[study] = std::move(e);
    }
    if (!r.done() || int64_t(entries_.size()) != count)
      fail("'", ids_path, "' is inconsistent (", count, " studies announced)", fix);
    // The core index file of this generation; rebuilt from the vectors above when unusable.
    clinvla_index* core = nullptr;
    const std::string core_path = path(core_name(generation_));
    const clinvla_status s = clinvla_index_load(core_path.c_str(), 1, &core);
    if (s == CLINVLA_OK && clinvla_index_dim(core) == dim_ && clinvla_index_dtype(core) == CLINVLA_FLOAT32 &&
        clinvla_index_size(core) == count) {
      core_ = core;
    } else {
      const std::string why = s == CLINVLA_OK ? "it does not match studies.ids" : status_text(s);
      if (core) clinvla_index_free(core);
      warn_("core index file '" + core_path + "' is unusable (" + why + "): rebuilt from studies.ids");
      rebuild_core();
    }
  } else {
    const clinvla_status s = clinvla_index_create(dim_, CLINVLA_FLOAT32, &core_);
    if (s != CLINVLA_OK) fail("cannot create an index of dimension ", dim_, ": ", status_text(s));
  }
  // Leftovers of other generations and of interrupted writes (only names this class makes).
  if (DIR* d = ::opendir(dir_.c_str())) {
    const std::string keep_log = log_name(generation_), keep_core = core_name(generation_);
    while (const dirent* de = ::readdir(d)) {
      const std::string n = de->d_name;
      const bool ours = (n.rfind("log-", 0) == 0 && n.find(".bin") != std::string::npos) ||
                        (n.rfind("index-", 0) == 0 && n.find(".clvx") != std::string::npos) ||
                        n.rfind(std::string(kIdsFile) + ".tmp-", 0) == 0;
      if (ours && n != keep_log && n != keep_core) ::unlink(path(n).c_str());
    }
    ::closedir(d);
  }
  replay_log();
  stats_.generation = generation_;
}

void StudyIndex::rebuild_core() {
  if (core_) clinvla_index_free(core_);
  core_ = nullptr;
  clinvla_status s = clinvla_index_create(dim_, CLINVLA_FLOAT32, &core_);
  if (s != CLINVLA_OK) fail("cannot create an index of dimension ", dim_, ": ", status_text(s));
  for (const auto& kv : entries_) {
    s = clinvla_index_add(core_, 1, kv.second.vector.data(), CLINVLA_FLOAT32, &kv.second.id, nullptr);
    if (s != CLINVLA_OK) fail("cannot rebuild the index of '", dir_, "': ", status_text(s));
  }
}

void StudyIndex::replay_log() {
  const std::string log_path = path(log_name(generation_));
  std::vector<uint8_t> log;
  const bool exists = read_file(log_path, &log);
  const auto header = log_header(dim_, generation_);
  if (!exists || log.size() < kLogHeaderBytes) {
    // Absent, or its header's write never completed (no record can follow a torn header).
    atomic_write(dir_, log_path, header);
    open_log_for_append(int64_t(header.size()));
    return;
  }
  if (std::memcmp(log.data(), header.data(), kLogHeaderBytes) != 0)
    fail("the log '", log_path, "' does not belong to this index (bad header): move it away to start "
         "from the last snapshot (studies missing then are re-indexed at start-up)");
  size_t pos = kLogHeaderBytes;
  int64_t records = 0;
  while (pos < log.size()) {
    if (log.size() - pos < 8) break;
    uint32_t len, crc;
    std::memcpy(&len, log.data() + pos, 4);
    std::memcpy(&crc, log.data() + pos + 4, 4);
    if (len == 0 || len > kMaxPayload || len > log.size() - pos - 8) break;
    const uint8_t* payload = log.data() + pos + 8;
    if (clinvla_crc32c(payload, len, 0) != crc) break;
    Reader r(payload, len);
    const auto kind = r.pod<uint8_t>();
    const auto id = r.pod<int64_t>();
    const std::string study = r.str();
    if (kind == kPut) {
      const std::string frontal = r.str(), lateral = r.str();
      const uint8_t* v = r.raw(size_t(dim_) * sizeof(float));
      if (!v || !r.done()) break;
      std::vector<float> vec(static_cast<size_t>(dim_));
      std::memcpy(vec.data(), v, vec.size() * sizeof(float));
      apply_put(id, study, frontal, lateral, vec.data());
    } else if (kind == kRemove && r.done()) {
      apply_remove(study);
    } else {
      break;
    }
    pos += 8 + len;
    ++records;
  }
  stats_.replayed_records = records;
  stats_.log_records = records;
  if (pos < log.size()) {
    stats_.dropped_tail_bytes = int64_t(log.size() - pos);
    warn_("the log '" + log_path + "' ends with " + std::to_string(log.size() - pos) +
          " bytes of a record whose write did not complete (a crash while indexing): cut off; that "
          "study was never acknowledged and is indexed again");
  }
  open_log_for_append(int64_t(pos));
}

void StudyIndex::open_log_for_append(int64_t valid_bytes) {
  const std::string log_path = path(log_name(generation_));
  const int fd = ::open(log_path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open the log '", log_path, "' for writing: ", errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat '", log_path, "': ", errno_text());
  }
  if (st.st_size != valid_bytes && (::ftruncate(fd, valid_bytes) != 0 || ::fsync(fd) != 0)) {
    const std::string e = errno_text();
    ::close(fd);
    fail("cannot cut the log '", log_path, "' to its last complete record: ", e);
  }
  if (log_fd_ >= 0) ::close(log_fd_);
  log_fd_ = fd;
  log_bytes_ = valid_bytes;
}

void StudyIndex::append(const std::vector<uint8_t>& payload) {
  if (broken_) fail("the index log in '", dir_, "' could not be repaired after a failed write: restart Orthanc");
  Writer rec;
  rec.pod(uint32_t(payload.size()));
  rec.pod(clinvla_crc32c(payload.data(), payload.size(), 0));
  rec.raw(payload.data(), payload.size());
  const std::string log_path = path(log_name(generation_));
  size_t done = 0;
  std::string error;
  while (done < rec.bytes.size()) {
    const ssize_t w = ::pwrite(log_fd_, rec.bytes.data() + done, rec.bytes.size() - done, log_bytes_ + off_t(done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      error = "cannot write the log '" + log_path + "': " + errno_text();
      break;
    }
    done += size_t(w);
  }
  if (error.empty() && ::fdatasync(log_fd_) != 0) error = "cannot flush the log '" + log_path + "': " + errno_text();
  if (!error.empty()) {
    // A partial record must not stay in front of later ones: cut it, or stop writing.
    if (::ftruncate(log_fd_, log_bytes_) != 0) broken_ = true;
    throw IndexError(error);
  }
  log_bytes_ += int64_t(rec.bytes.size());
  ++stats_.log_records;
}

void StudyIndex::apply_put(int64_t id, const std::string& study, const std::string& frontal,
                           const std::string& lateral, const float* vector) {
  auto it = entries_.find(study);
  if (it != entries_.end()) {
    const int64_t old = it->second.id;
    const clinvla_status s = clinvla_index_remove(core_, 1, &old, nullptr);
    if (s != CLINVLA_OK) fail("cannot replace study ", study, " in the index: ", status_text(s));
    by_id_.erase(old);
  }
  const clinvla_status s = clinvla_index_add(core_, 1, vector, CLINVLA_FLOAT32, &id, nullptr);
  if (s != CLINVLA_OK) {
    if (it != entries_.end()) entries_.erase(it);
    fail("cannot add study ", study, " to the index: ", status_text(s));
  }
  StudyEntry& e = entries_[study];
  e.id = id;
  e.frontal = frontal;
  e.lateral = lateral;
  e.vector.assign(vector, vector + dim_);
  by_id_[id] = study;
  next_id_ = std::max(next_id_, id + 1);
}

bool StudyIndex::apply_remove(const std::string& study) {
  auto it = entries_.find(study);
  if (it == entries_.end()) return false;
  const int64_t id = it->second.id;
  const clinvla_status s = clinvla_index_remove(core_, 1, &id, nullptr);
  if (s != CLINVLA_OK) fail("cannot remove study ", study, " from the index: ", status_text(s));
  by_id_.erase(id);
  entries_.erase(it);
  return true;
}

void StudyIndex::put(const std::string& study, const std::string& frontal, const std::string& lateral,
                     const float* vector) {
  if (study.empty()) fail("a study id is required");
  for (int64_t i = 0; i < dim_; ++i)
    if (!std::isfinite(vector[i])) fail("the vector of study ", study, " has a non-finite value at ", i);
  std::unique_lock<std::shared_mutex> lock(mu_);
  const int64_t id = next_id_;
  Writer w;
  w.pod(kPut);
  w.pod(id);
  w.str(study);
  w.str(frontal);
  w.str(lateral);
  w.raw(vector, size_t(dim_) * sizeof(float));
  append(w.bytes);
  apply_put(id, study, frontal, lateral, vector);
  if (stats_.log_records >= snapshot_every_) {
    try {
      snapshot_locked();
    } catch (const std::exception& e) {
      warn_(std::string("snapshot failed (the log keeps every change; retried after the next record): ") + e.what());
    }
  }
}

bool StudyIndex::remove(const std::string& study) {
  std::unique_lock<std::shared_mutex> lock(mu_);
  auto it = entries_.find(study);
  if (it == entries_.end()) return false;
  Writer w;
  w.pod(kRemove);
  w.pod(it->second.id);
  w.str(study);
  append(w.bytes);
  apply_remove(study);
  if (stats_.log_records >= snapshot_every_) {
    try {
      snapshot_locked();
    } catch (const std::exception& e) {
      warn_(std::string("snapshot failed (the log keeps every change): ") + e.what());
    }
  }
  return true;
}

void StudyIndex::snapshot() {
  std::unique_lock<std::shared_mutex> lock(mu_);
  snapshot_locked();
}

void StudyIndex::snapshot_locked() {
  const uint64_t next = generation_ + 1;
  const std::string core_path = path(core_name(next));
  const clinvla_status s = clinvla_index_save(core_, core_path.c_str());
  if (s != CLINVLA_OK) fail("cannot write '", core_path, "': ", status_text(s));
  Writer w;
  w.raw(kIdsMagic, 8);
  w.pod(kVersion);
  w.pod(uint32_t(dim_));
  w.pod(next);
  w.pod(next_id_);
  w.pod(int64_t(entries_.size()));
  w.str(fingerprint_);
  for (const auto& kv : entries_) {
    w.pod(kv.second.id);
    w.str(kv.first);
    w.str(kv.second.frontal);
    w.str(kv.second.lateral);
    w.raw(kv.second.vector.data(), kv.second.vector.size() * sizeof(float));
  }
  w.pod(clinvla_crc32c(w.bytes.data(), w.bytes.size(), 0));
  // The new log exists (empty) before the commit so that the committed generation always has one.
  const std::string next_log = path(log_name(next));
  atomic_write(dir_, next_log, log_header(dim_, next));
  atomic_write(dir_, path(kIdsFile), w.bytes);  // the commit
  const uint64_t old = generation_;
  generation_ = next;
  open_log_for_append(int64_t(kLogHeaderBytes));
  ::unlink(path(log_name(old)).c_str());
  ::unlink(path(core_name(old)).c_str());
  stats_.log_records = 0;
  stats_.generation = generation_;
  ++stats_.snapshots;
}

std::vector<Hit> StudyIndex::search(const float* query, int64_t k, const std::string& exclude) const {
  if (k < 1) fail("k must be >= 1, got ", k);
  for (int64_t i = 0; i < dim_; ++i)
    if (!std::isfinite(query[i])) fail("the query vector has a non-finite value at ", i);
  std::shared_lock<std::shared_mutex> lock(mu_);
  const int64_t n = int64_t(entries_.size());
  std::vector<Hit> hits;
  if (n == 0) return hits;
  const int64_t want = std::min<int64_t>(n, k + (exclude.empty() ? 0 : 1));
  std::vector<float> scores(static_cast<size_t>(want));
  std::vector<int64_t> ids(static_cast<size_t>(want));
  const clinvla_status s = clinvla_index_search(core_, 1, query, CLINVLA_FLOAT32, want, nullptr, scores.data(), ids.data());
  if (s != CLINVLA_OK) fail("index search failed: ", status_text(s));
  for (int64_t i = 0; i < want && int64_t(hits.size()) < k; ++i) {
    if (ids[i] < 0) continue;
    if (!std::isfinite(scores[i])) fail("the index gave a non-finite score for id ", ids[i]);
    auto it = by_id_.find(ids[i]);
    if (it == by_id_.end()) fail("the index gave id ", ids[i], " which maps to no study (internal error)");
    if (it->second == exclude) continue;
    const StudyEntry& e = entries_.at(it->second);
    hits.push_back(Hit{it->second, scores[i], e.frontal, e.lateral});
  }
  return hits;
}

bool StudyIndex::get(const std::string& study, StudyEntry* out) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  auto it = entries_.find(study);
  if (it == entries_.end()) return false;
  if (out) *out = it->second;
  return true;
}

bool StudyIndex::contains(const std::string& study) const { return get(study, nullptr); }

std::vector<std::string> StudyIndex::studies() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& kv : entries_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

int64_t StudyIndex::size() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  return int64_t(entries_.size());
}

IndexStats StudyIndex::stats() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  IndexStats s = stats_;
  s.studies = int64_t(entries_.size());
  return s;
}

}  // namespace clinvla_orthanc
