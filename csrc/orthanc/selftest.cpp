// clinvla_orthanc_selftest SCRATCH_DIR: the plugin's persistent index (reload, snapshots, torn and
// corrupt logs, refusals), work queue and view picking, without Orthanc or an engine.
// Prints one line per check and exits non-zero on the first failure.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "frame_check.hpp"
#include "study_index.hpp"
#include "views.hpp"
#include "work_queue.hpp"

using namespace clinvla_orthanc;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

namespace {

constexpr int64_t kDim = 24;
std::vector<std::string> g_warnings;

std::vector<float> unit_vector(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<float> v(kDim);
  double norm = 0;
  for (auto& x : v) {
    x = n(rng);
    norm += double(x) * x;
  }
  for (auto& x : v) x = float(x / std::sqrt(norm));
  return v;
}

StudyIndex* open_index(const std::string& dir, int64_t snapshot_every = 1000, const std::string& fp = "engine-a",
                       int64_t dim = kDim) {
  return new StudyIndex(dir, dim, fp, snapshot_every, [](const std::string& m) { g_warnings.push_back(m); });
}

std::string fresh_dir(const std::string& root, const std::string& name) {
  const std::string d = root + "/" + name;
  std::string cmd = "rm -rf '" + d + "'";
  CHECK(std::system(cmd.c_str()) == 0);
  return d;
}

int64_t file_size(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 ? int64_t(st.st_size) : -1;
}

bool exists(const std::string& p) { return file_size(p) >= 0; }

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const IndexError& e) {
    return e.what();
  }
  return std::string();
}

std::string study_name(int i) { return "study-" + std::to_string(i); }

void check_top1(const StudyIndex& index, int i) {
  const auto v = unit_vector(uint32_t(i));
  const auto hits = index.search(v.data(), 1);
  CHECK(hits.size() == 1);
  CHECK(hits[0].study == study_name(i));
  CHECK(std::fabs(hits[0].score - 1.f) < 1e-5f);
}

void test_put_search_remove_reload(const std::string& root) {
  const std::string dir = fresh_dir(root, "basic");
  {
    std::unique_ptr<StudyIndex> index(open_index(dir));
    for (int i = 0; i < 6; ++i) index->put(study_name(i), "f" + std::to_string(i), i % 2 ? "l" : "", unit_vector(uint32_t(i)).data());
    CHECK(index->size() == 6);
    for (int i = 0; i < 6; ++i) check_top1(*index, i);
    CHECK(index->remove(study_name(3)));
    CHECK(!index->remove(study_name(3)));
    CHECK(!index->contains(study_name(3)));
    // replacing keeps one entry per study, with the new vector
    index->put(study_name(0), "f0b", "", unit_vector(100).data());
    StudyEntry e;
    CHECK(index->get(study_name(0), &e) && e.frontal == "f0b" && e.vector == unit_vector(100));
    const auto hits = index->search(unit_vector(1).data(), 10, study_name(1));
    CHECK(hits.size() == 4);
    for (const auto& h : hits) CHECK(h.study != study_name(1) && h.study != study_name(3));
    for (size_t i = 1; i < hits.size(); ++i) CHECK(hits[i - 1].score >= hits[i].score);
    // a second process on the same folder is refused while this one holds it
    const std::string err = error_of([&] { delete open_index(dir); });
    CHECK(err.find("in use by another process") != std::string::npos);
  }
  std::unique_ptr<StudyIndex> index(open_index(dir));
  CHECK(index->size() == 5);
  CHECK(index->stats().replayed_records == 8);
  CHECK(!index->contains(study_name(3)));
  for (int i : {1, 2, 4, 5}) check_top1(*index, i);
  StudyEntry e;
  CHECK(index->get(study_name(1), &e) && e.frontal == "f1" && e.lateral == "l" && e.vector == unit_vector(1));
  CHECK(index->get(study_name(0), &e) && e.frontal == "f0b" && e.vector == unit_vector(100));
  std::puts("ok put / search / remove / replace / reload / one process per folder");
}

void test_snapshots(const std::string& root) {
  const std::string dir = fresh_dir(root, "snap");
  {
    std::unique_ptr<StudyIndex> index(open_index(dir, 3));
    for (int i = 0; i < 7; ++i) index->put(study_name(i), "f", "", unit_vector(uint32_t(i)).data());
    index->remove(study_name(2));
    const IndexStats st = index->stats();
    CHECK(st.generation == 2 && st.snapshots == 2 && st.log_records == 2);
  }
  CHECK(exists(dir + "/studies.ids") && exists(dir + "/index-2.clvx") && exists(dir + "/log-2.bin"));
  CHECK(!exists(dir + "/log-1.bin") && !exists(dir + "/index-1.clvx") && !exists(dir + "/log-0.bin"));
  {
    std::unique_ptr<StudyIndex> index(open_index(dir, 3));
    CHECK(index->size() == 6 && !index->contains(study_name(2)));
    CHECK(index->stats().replayed_records == 2);
    for (int i : {0, 1, 3, 4, 5, 6}) check_top1(*index, i);
  }
  // a damaged core index file is rebuilt from studies.ids (which holds the vectors too)
  CHECK(::truncate((dir + "/index-2.clvx").c_str(), 10) == 0);
  g_warnings.clear();
  {
    std::unique_ptr<StudyIndex> index(open_index(dir, 3));
    CHECK(index->size() == 6);
    for (int i : {0, 1, 3, 4, 5, 6}) check_top1(*index, i);
    CHECK(g_warnings.size() == 1 && g_warnings[0].find("rebuilt") != std::string::npos);
  }
  // leftovers of a snapshot that crashed before its commit are cleaned, the committed one kept
  { std::ofstream(dir + "/index-3.clvx") << "partial"; std::ofstream(dir + "/log-3.bin") << "x"; std::ofstream(dir + "/studies.ids.tmp-abc123") << "x"; }
  {
    std::unique_ptr<StudyIndex> index(open_index(dir, 3));
    CHECK(index->size() == 6 && index->stats().generation == 2);
  }
  CHECK(!exists(dir + "/index-3.clvx") && !exists(dir + "/log-3.bin") && !exists(dir + "/studies.ids.tmp-abc123"));
  std::puts("ok snapshots: log restarts, old generation deleted, damaged core file rebuilt, leftovers cleaned");
}

void test_torn_and_corrupt_log(const std::string& root) {
  const std::string dir = fresh_dir(root, "torn");
  int64_t after3 = 0;
  {
    std::unique_ptr<StudyIndex> index(open_index(dir));
    for (int i = 0; i < 3; ++i) index->put(study_name(i), "f", "", unit_vector(uint32_t(i)).data());
    after3 = file_size(dir + "/log-0.bin");
    index->put(study_name(3), "f", "", unit_vector(3).data());
  }
  const std::string log = dir + "/log-0.bin";
  const int64_t full = file_size(log);
  // a crash in the middle of the 4th record's write: only part of it reached the disk
  CHECK(::truncate(log.c_str(), after3 + (full - after3) / 2) == 0);
  g_warnings.clear();
  {
    std::unique_ptr<StudyIndex> index(open_index(dir));
    CHECK(index->size() == 3 && !index->contains(study_name(3)));
    CHECK(index->stats().dropped_tail_bytes == (full - after3) / 2);
    CHECK(g_warnings.size() == 1 && g_warnings[0].find("cut off") != std::string::npos);
    CHECK(file_size(log) == after3);  // cut, so that the next record follows a complete one
    index->put(study_name(4), "f", "", unit_vector(4).data());
  }
  {
    std::unique_ptr<StudyIndex> index(open_index(dir));
    CHECK(index->size() == 4 && index->contains(study_name(4)) && index->stats().dropped_tail_bytes == 0);
    for (int i : {0, 1, 2, 4}) check_top1(*index, i);
  }
  // a flipped byte inside the last record's vector: its CRC fails, it is dropped, the rest is kept
  {
    const int fd = ::open(log.c_str(), O_RDWR);
    CHECK(fd >= 0);
    const off_t at = off_t(file_size(log) - 5);
    unsigned char b = 0;
    CHECK(::pread(fd, &b, 1, at) == 1);
    b ^= 0x40;
    CHECK(::pwrite(fd, &b, 1, at) == 1);
    ::close(fd);
  }
  {
    std::unique_ptr<StudyIndex> index(open_index(dir));
    CHECK(index->size() == 3 && !index->contains(study_name(4)));
  }
  std::puts("ok torn log tail cut off and later records still replayed; corrupt record dropped by its CRC");
}

void test_refusals(const std::string& root) {
  const std::string dir = fresh_dir(root, "refuse");
  {
    std::unique_ptr<StudyIndex> index(open_index(dir, 1));
    index->put(study_name(0), "f", "", unit_vector(0).data());
    std::vector<float> bad = unit_vector(1);
    bad[3] = NAN;
    CHECK(error_of([&] { index->put(study_name(1), "f", "", bad.data()); }).find("non-finite") != std::string::npos);
    CHECK(error_of([&] { index->search(bad.data(), 3); }).find("non-finite") != std::string::npos);
    CHECK(!index->contains(study_name(1)));
  }
  std::string err = error_of([&] { delete open_index(dir, 1, "engine-b"); });
  CHECK(err.find("another engine") != std::string::npos && err.find("IndexDirectory") != std::string::npos);
  err = error_of([&] { delete open_index(dir, 1, "engine-a", kDim + 1); });
  CHECK(err.find("another engine") != std::string::npos);
  {
    std::fstream f(dir + "/studies.ids", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('\x7f');
  }
  err = error_of([&] { delete open_index(dir, 1); });
  CHECK(err.find("damaged") != std::string::npos);
  std::puts("ok refusals: non-finite vectors, another engine or dimension, a damaged study map");
}

void test_queue() {
  WorkQueue q;
  Task t;
  q.push(TaskKind::Index, "a");
  q.push(TaskKind::Index, "b");
  q.push(TaskKind::Remove, "a");  // the latest wish for a study wins, in its original place
  q.push(TaskKind::Scan, "");
  q.push(TaskKind::Rescan, "");
  q.push(TaskKind::Scan, "");
  CHECK(q.pending() == 3);
  CHECK(q.pop(&t) && t.study == "a" && t.kind == TaskKind::Remove);
  q.push(TaskKind::Index, "a");  // queued again while in progress: waits for done()
  Task t2;
  CHECK(q.pop(&t2) && t2.study == "b");
  Task t3;
  CHECK(q.pop(&t3) && t3.study.empty() && t3.kind == TaskKind::Rescan);
  CHECK(q.in_progress() == 3 && q.pending() == 1);
  q.done(t);
  Task t4;
  CHECK(q.pop(&t4) && t4.study == "a" && t4.kind == TaskKind::Index);
  q.stop();
  CHECK(!q.pop(&t4) && !q.push(TaskKind::Index, "c"));
  std::puts("ok work queue: one task per study, latest wins, never two workers on one study");
}

Candidate cand(const std::string& id, int view, const std::string& label, int64_t pixels, int number = -1,
               const std::string& path = "") {
  Candidate c;
  c.instance = id, c.view = view, c.label = label, c.pixels = pixels;
  c.has_number = number >= 0, c.number = number, c.path = path.empty() ? id : path;
  return c;
}

void test_pick() {
  const PickRanks ranks = load_pick_ranks(CLINVLA_ORTHANC_VIEW_RULES);
  CHECK(ranks.modality_allowed("DX") && ranks.modality_allowed("CR") && !ranks.modality_allowed("CT"));
  // rank first: PA before a bigger AP; LL before LATERAL
  auto p = pick_views({cand("ap", 1, "AP", 900), cand("pa", 1, "PA", 100), cand("lat", 2, "LATERAL", 900), cand("ll", 2, "LL", 10)}, ranks);
  CHECK(p.first == 1 && p.second == 3);
  // then most pixels, then lowest InstanceNumber (missing last), then smallest path
  p = pick_views({cand("a", 1, "PA", 100, 5), cand("b", 1, "PA", 200, 9)}, ranks);
  CHECK(p.first == 1 && p.second == -1);
  p = pick_views({cand("a", 1, "PA", 100), cand("b", 1, "PA", 100, 9), cand("c", 1, "PA", 100, 3)}, ranks);
  CHECK(p.first == 2);
  p = pick_views({cand("a", 1, "FRONTAL", 100, -1, "z"), cand("b", 1, "FRONTAL", 100, -1, "y")}, ranks);
  CHECK(p.first == 1);
  // an unranked label comes after every ranked one; no frontal -> -1
  p = pick_views({cand("a", 1, "ODD", 999), cand("b", 1, "FRONTAL", 1)}, ranks);
  CHECK(p.first == 1);
  p = pick_views({cand("a", 2, "LL", 100), cand("b", 0, "", 100)}, ranks);
  CHECK(p.first == -1 && p.second == 0);
  bool threw = false;
  try {
    load_pick_ranks("/nonexistent/view_rules.json");
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("ClinVLA.ViewRules") != std::string::npos;
  }
  CHECK(threw);
  std::puts("ok view picking follows view_rules.json's pick ranks and Python's tie-breaks");
}

void test_frame_check() {
  const std::string jpeg = "1.2.840.10008.1.2.4.50", rle = "1.2.840.10008.1.2.5";
  CHECK(frame_check_applies(jpeg) && frame_check_applies("1.2.840.10008.1.2.4.80") && frame_check_applies(rle));
  CHECK(!frame_check_applies("1.2.840.10008.1.2.1") && !frame_check_applies("1.2.840.10008.1.2.4.90"));
  // SOI, APP0 (length 4), SOF0 (8-bit, 16 x 8, one component), SOS
  std::vector<uint8_t> good = {0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x0B, 0x08,
                               0x00, 0x08, 0x00, 0x10, 0x01, 0x01, 0x11, 0x00, 0xFF, 0xDA, 0x00, 0x02};
  CHECK(check_compressed_frame(jpeg, good.data(), good.size()).empty());
  auto bad = good;
  bad[12] = 0;  // precision 0: the GDCM assertion that aborts Orthanc
  CHECK(check_compressed_frame(jpeg, bad.data(), bad.size()).find("precision 0") != std::string::npos);
  bad = good;
  bad[1] = 0x00;
  CHECK(!check_compressed_frame(jpeg, bad.data(), bad.size()).empty());
  CHECK(!check_compressed_frame(jpeg, good.data(), 12).empty());  // ends before the SOF
  std::vector<uint8_t> r(200, 0);
  CHECK(!check_compressed_frame(rle, r.data(), r.size()).empty());  // all zeros: the crashing case
  r[0] = 1, r[4] = 64;
  CHECK(check_compressed_frame(rle, r.data(), r.size()).empty());
  r[4] = 250;
  CHECK(!check_compressed_frame(rle, r.data(), r.size()).empty());
  std::puts("ok compressed frame headers: JPEG SOF and RLE segment table checked before Orthanc decodes");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  ::mkdir(root.c_str(), 0755);
  test_put_search_remove_reload(root);
  test_snapshots(root);
  test_torn_and_corrupt_log(root);
  test_refusals(root);
  test_queue();
  test_pick();
  test_frame_check();
  std::puts("all passed");
  return 0;
}
