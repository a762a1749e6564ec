// C++ test program for the ClinVLA core, written against the public headers only
// (clinvla/index.hpp and the C API clinvla/clinvla.h). Built and run by tests/test_index.py
// through csrc/CMakeLists.txt; prints one line per check and exits non-zero on the first failure.
#include <clinvla/clinvla.h>
#include <clinvla/index.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <thread>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

int g_checks = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

// Reference: float64 scores, sorted by (score desc, id asc), ids >= n_allowed are skipped.
void brute_force(const std::vector<float>& db, const std::vector<int64_t>& ids, const std::vector<float>& q,
                 int64_t dim, int64_t k, std::vector<double>& out_s, std::vector<int64_t>& out_i) {
  const int64_t n = int64_t(ids.size()), nq = int64_t(q.size()) / dim;
  out_s.assign(size_t(nq * k), -std::numeric_limits<double>::infinity());
  out_i.assign(size_t(nq * k), -1);
  for (int64_t a = 0; a < nq; ++a) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t r = 0; r < n; ++r) {
      double s = 0;
      for (int64_t d = 0; d < dim; ++d) s += double(q[size_t(a * dim + d)]) * double(db[size_t(r * dim + d)]);
      all.push_back({s, ids[size_t(r)]});
    }
    std::sort(all.begin(), all.end(), [](auto& x, auto& y) { return x.first > y.first || (x.first == y.first && x.second < y.second); });
    for (int64_t j = 0; j < std::min(k, n); ++j) {
      out_s[size_t(a * k + j)] = all[size_t(j)].first;
      out_i[size_t(a * k + j)] = all[size_t(j)].second;
    }
  }
}

void test_cpp_api() {
  const int64_t dim = 37, n = 1500, nq = 9, k = 12;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-3, 3);
  // Small integers: every score is exact, so ids (ties included) must match exactly.
  std::vector<float> db(size_t(n * dim)), q(size_t(nq * dim));
  for (auto& v : db) v = float(small(rng));
  for (int64_t r = 100; r < 200; ++r)  // duplicates of row 7: ties broken by the smaller id
    std::copy(db.begin() + 7 * dim, db.begin() + 8 * dim, db.begin() + r * dim);
  for (auto& v : q) v = float(small(rng));

  for (clinvla::DType dt : {clinvla::DType::Float32, clinvla::DType::Float16, clinvla::DType::BFloat16}) {
    clinvla::FlatIndex index(dim, dt);
    std::vector<int64_t> assigned(static_cast<size_t>(n));
    index.add(n, db.data(), clinvla::DType::Float32, nullptr, assigned.data());
    CHECK(index.size() == n, "size %lld", (long long)index.size());
    CHECK(assigned[0] == 0 && assigned[size_t(n - 1)] == n - 1, "sequential ids");
    std::vector<int64_t> ids(static_cast<size_t>(n));
    std::iota(ids.begin(), ids.end(), 0);
    std::vector<double> ref_s;
    std::vector<int64_t> ref_i;
    brute_force(db, ids, q, dim, k, ref_s, ref_i);
    std::vector<float> scores(static_cast<size_t>(nq * k));
    std::vector<int64_t> out(static_cast<size_t>(nq * k));
    index.search(nq, q.data(), clinvla::DType::Float32, k, scores.data(), out.data());
    for (size_t i = 0; i < out.size(); ++i) {
      CHECK(out[i] == ref_i[i], "%s: id[%zu] = %lld, expected %lld", clinvla::dtype_name(dt), i, (long long)out[i],
            (long long)ref_i[i]);
      CHECK(double(scores[i]) == ref_s[i], "%s: score[%zu]", clinvla::dtype_name(dt), i);
    }
  }
  std::printf("ok  C++ API: exact ids and scores, ties by smaller id, 3 dtypes\n");

  // k > n, empty index, remove, errors
  clinvla::FlatIndex small_index(4, clinvla::DType::Float32);
  float scores[6];
  int64_t out[6];
  const float q4[4] = {1, 0, 0, 0};
  small_index.search(1, q4, clinvla::DType::Float32, 6, scores, out);
  CHECK(out[0] == -1 && std::isinf(scores[0]) && scores[0] < 0, "empty index gives -1 / -inf");
  const float v[8] = {1, 0, 0, 0, 2, 0, 0, 0};
  const int64_t my_ids[2] = {40, 12};
  small_index.add(2, v, clinvla::DType::Float32, my_ids);
  small_index.search(1, q4, clinvla::DType::Float32, 6, scores, out);
  CHECK(out[0] == 12 && out[1] == 40 && out[2] == -1 && scores[0] == 2.f, "k > n");
  CHECK(small_index.next_id() == 41, "next_id after explicit ids");
  bool threw = false;
  try {
    small_index.add(1, v, clinvla::DType::Float32, my_ids);
  } catch (const clinvla::Error& e) {
    threw = e.code() == clinvla::ErrorCode::Invalid && std::string(e.what()).find("already") != std::string::npos;
  }
  CHECK(threw, "duplicate id refused");
  const float bad[4] = {1, std::nanf(""), 0, 0};
  threw = false;
  try {
    small_index.search(1, bad, clinvla::DType::Float32, 1, scores, out);
  } catch (const clinvla::Error& e) {
    threw = std::string(e.what()).find("finite") != std::string::npos;
  }
  CHECK(threw, "NaN query refused");
  CHECK(small_index.remove(1, &my_ids[1]) == 1 && small_index.size() == 1 && !small_index.contains(12), "remove");
  std::printf("ok  C++ API: k > n, empty index, explicit ids, duplicates, NaN, remove\n");
}

void test_c_api(const std::string& dir) {
  CHECK(clinvla_crc32c("123456789", 9, 0) == 0xE3069283u, "CRC-32C check value, got %08x",
        clinvla_crc32c("123456789", 9, 0));
  CHECK(clinvla_crc32c("56789", 5, clinvla_crc32c("1234", 4, 0)) == 0xE3069283u, "CRC-32C continuation");
  std::printf("ok  C API: CRC-32C check value (cpu kernels: %s)\n", clinvla_cpu_isa());

  clinvla_index* index = nullptr;
  CHECK(clinvla_index_create(0, CLINVLA_FLOAT16, &index) == CLINVLA_ERR_INVALID && index == nullptr, "dim 0 refused");
  CHECK(std::strstr(clinvla_last_error(), "dim") != nullptr, "message names dim: %s", clinvla_last_error());
  CHECK(clinvla_index_create(16, CLINVLA_FLOAT16, &index) == CLINVLA_OK, "%s", clinvla_last_error());

  const int64_t n = 300, dim = 16;
  std::vector<float> db(size_t(n * dim));
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (auto& x : db) x = normal(rng);
  CHECK(clinvla_index_add(index, n, db.data(), CLINVLA_FLOAT32, nullptr, nullptr) == CLINVLA_OK, "%s", clinvla_last_error());
  CHECK(clinvla_index_size(index) == n && clinvla_index_dim(index) == dim && clinvla_index_dtype(index) == CLINVLA_FLOAT16, "meta");

  // Query = a stored row (as float16 bits via the index's own conversion: search with float32).
  float scores[5];
  int64_t ids[5];
  CHECK(clinvla_index_search(index, 1, db.data() + 42 * dim, CLINVLA_FLOAT32, 5, nullptr, scores, ids) == CLINVLA_OK, "%s",
        clinvla_last_error());
  for (int j = 1; j < 5; ++j) CHECK(scores[j - 1] >= scores[j], "sorted");

  // Allow-list: only ids 5 and 250 (packed bitmap).
  std::vector<uint8_t> bits(64, 0);
  bits[5 / 8] |= uint8_t(1u << (5 % 8));
  bits[250 / 8] |= uint8_t(1u << (250 % 8));
  clinvla_allow allow = {bits.data(), int64_t(bits.size()) * 8, 0, 1};
  CHECK(clinvla_index_search(index, 1, db.data(), CLINVLA_FLOAT32, 5, &allow, scores, ids) == CLINVLA_OK, "%s", clinvla_last_error());
  CHECK((ids[0] == 5 || ids[0] == 250) && (ids[1] == 5 || ids[1] == 250) && ids[2] == -1, "allow-list: %lld %lld %lld",
        (long long)ids[0], (long long)ids[1], (long long)ids[2]);

  const std::string path = dir + "/capi.clvx";
  CHECK(clinvla_index_save(index, path.c_str()) == CLINVLA_OK, "%s", clinvla_last_error());
  clinvla_index* loaded = nullptr;
  CHECK(clinvla_index_load(path.c_str(), 1, &loaded) == CLINVLA_OK, "%s", clinvla_last_error());
  float s2[5];
  int64_t i2[5];
  CHECK(clinvla_index_search(loaded, 1, db.data() + 42 * dim, CLINVLA_FLOAT32, 5, nullptr, s2, i2) == CLINVLA_OK, "search");
  CHECK(clinvla_index_search(index, 1, db.data() + 42 * dim, CLINVLA_FLOAT32, 5, nullptr, scores, ids) == CLINVLA_OK, "search");
  CHECK(std::memcmp(s2, scores, sizeof s2) == 0 && std::memcmp(i2, ids, sizeof i2) == 0, "round trip");
  int64_t removed = 0;
  const int64_t gone[3] = {ids[0], 999999, ids[0]};
  CHECK(clinvla_index_remove(loaded, 3, gone, &removed) == CLINVLA_OK && removed == 1, "remove from a mapped index");
  CHECK(clinvla_index_size(loaded) == n - 1, "size after remove");
  clinvla_index_free(loaded);

  // Truncated file: refused with a format error that says so.
  {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string cut = dir + "/cut.clvx";
    std::ofstream(cut, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size() - 9));
    CHECK(clinvla_index_load(cut.c_str(), 1, &loaded) == CLINVLA_ERR_FORMAT && loaded == nullptr, "truncated refused");
    CHECK(std::strstr(clinvla_last_error(), "truncated") != nullptr, "message: %s", clinvla_last_error());
    std::string flipped = bytes;
    flipped[flipped.size() / 2] ^= 0x10;
    const std::string flip = dir + "/flip.clvx";
    std::ofstream(flip, std::ios::binary).write(flipped.data(), std::streamsize(flipped.size()));
    CHECK(clinvla_index_load(flip.c_str(), 1, &loaded) == CLINVLA_ERR_FORMAT, "bit flip refused");
    CHECK(std::strstr(clinvla_last_error(), "checksum") != nullptr, "message: %s", clinvla_last_error());
  }
  CHECK(clinvla_index_load((dir + "/missing.clvx").c_str(), 1, &loaded) == CLINVLA_ERR_IO, "missing file is an IO error");

  // k is bounded before anything is allocated (the caller's buffers are never touched).
  CHECK(clinvla_index_search(index, 1, db.data(), CLINVLA_FLOAT32, int64_t(1) << 30, nullptr, scores, ids) ==
            CLINVLA_ERR_INVALID, "a k of 2^30 refused");
  CHECK(std::strstr(clinvla_last_error(), "65536") != nullptr, "message: %s", clinvla_last_error());

  // Concurrent saves to one path: each writer uses its own temporary name, so every save succeeds
  // and the file is always whole (a shared fixed temporary name made renames fail or mix files).
  {
    std::atomic<int> failures{0};
    std::vector<std::thread> writers;
    for (int w = 0; w < 4; ++w)
      writers.emplace_back([&] {
        for (int i = 0; i < 25; ++i)
          if (clinvla_index_save(index, path.c_str()) != CLINVLA_OK) ++failures;
      });
    for (auto& t : writers) t.join();
    CHECK(failures.load() == 0, "%d of 100 concurrent saves failed", failures.load());
    CHECK(clinvla_index_load(path.c_str(), 1, &loaded) == CLINVLA_OK, "%s", clinvla_last_error());
    CHECK(clinvla_index_size(loaded) == clinvla_index_size(index), "whole file after concurrent saves");
    clinvla_index_free(loaded);
  }

  // CUDA entry points: unsupported or no device here, never a crash.
  clinvla_cuda_index* cuda = nullptr;
  const clinvla_status st = clinvla_cuda_index_create(index, 0, &cuda);
  if (clinvla_cuda_device_count() == 0) {
    CHECK(st == CLINVLA_ERR_UNSUPPORTED && cuda == nullptr, "CUDA create without a device: status %d", int(st));
  } else {
    CHECK(st == CLINVLA_OK, "%s", clinvla_last_error());
    clinvla_cuda_index_free(cuda);
  }
  clinvla_index_free(index);
  std::printf("ok  C API: create/add/search/allow/save/load/remove, truncated + flipped files refused, CUDA status %d\n",
              int(st));
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";
  test_cpp_api();
  test_c_api(dir);
  std::printf("all %d checks passed (clinvla %s)\n", g_checks, clinvla_version());
  return 0;
}
