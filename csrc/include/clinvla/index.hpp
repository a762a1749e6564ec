// ClinVLA exact top-k retrieval: the public C++ API (torch-free, C++17).
//
// A flat inner-product index over float32 / float16 / bfloat16 vectors with 64-bit ids.
// search() returns, for every query, the k stored vectors with the largest inner product,
// sorted by score descending with ties broken by the smaller id; slots beyond the number of
// (allowed) vectors hold id -1 and score -inf.
//
// Memory is caller-owned: every pointer argument is a plain row-major buffer that the caller
// allocates (host memory for FlatIndex; device memory on the index's GPU for CudaFlatIndex).
// Errors are thrown as clinvla::Error with a message that names what was expected and what was
// given. The C API in clinvla.h wraps the same objects for C and PACS code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace clinvla {

enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

const char* dtype_name(DType dtype);     // "float32" | "float16" | "bfloat16"
std::size_t dtype_size(DType dtype);     // 4 | 2 | 2
const char* version();                   // "0.1.0"

enum class ErrorCode : int32_t {
  Invalid = 1,      // bad argument (shape, dtype, value, unknown id, ...)
  IO = 2,           // the operating system refused a file operation
  Format = 3,       // a file is not a valid index (magic, version, truncated, checksum)
  OutOfMemory = 4,
  Unsupported = 5,  // feature not built (e.g. CUDA) or not available on this machine
  Cuda = 6,         // a CUDA call failed
  Internal = 7,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// Restricts a search to a subset of ids, inside the scan (a vector that is not allowed is never a
// candidate, so k allowed results come back whenever k allowed vectors exist).
//   packed = true : bit (id % 8) of byte data[id / 8] (little bit order, numpy.packbits(...,
//                   bitorder="little")); ids >= n_ids are not allowed.
//   packed = false: one byte per id, non-zero = allowed (a bool array); ids >= n_ids not allowed.
// stride_bytes = 0 shares one list between all queries; otherwise query i reads data + i*stride.
struct AllowList {
  const uint8_t* data = nullptr;  // nullptr: every id is allowed
  int64_t n_ids = 0;
  int64_t stride_bytes = 0;
  bool packed = true;
};

struct SearchOptions {
  int num_threads = 0;  // 0: OpenMP's default (OMP_NUM_THREADS or all cores)
};

// Which CPU kernel variant runs searches: "generic", "avx2" or "avx512" (chosen at run time from
// what the CPU supports; CLINVLA_CPU_ISA=generic|avx2|avx512 or set_cpu_isa() picks a lower one).
const char* cpu_isa();
void set_cpu_isa(const std::string& name);  // throws Error(Unsupported) if the CPU lacks it
bool openmp_enabled();

class FlatIndex {
 public:
  // The largest k a search accepts: a bound checked before any allocation, so a k of 10^9 from a
  // caller is a clear error instead of an out-of-memory kill (the Python Index uses the same value).
  static constexpr int64_t kMaxK = 65536;

  FlatIndex(int64_t dim, DType dtype);
  ~FlatIndex();
  FlatIndex(FlatIndex&&) noexcept;
  FlatIndex& operator=(FlatIndex&&) noexcept;
  FlatIndex(const FlatIndex&) = delete;
  FlatIndex& operator=(const FlatIndex&) = delete;

  int64_t dim() const;
  DType dtype() const;
  int64_t size() const;
  int64_t next_id() const;  // the id add() gives the next vector when no ids are passed

  // vectors: (n, dim) row-major in src_dtype, converted to the index's dtype (round to nearest
  // even); NaN, infinite, or values that overflow the index's dtype are refused.
  // ids: n distinct ids >= 0 not yet present, or nullptr for next_id(), next_id() + 1, ...
  // assigned_ids: optional (n), receives the ids given.
  void add(int64_t n, const void* vectors, DType src_dtype, const int64_t* ids = nullptr,
           int64_t* assigned_ids = nullptr);

  // Removes the vectors with these ids (unknown ids are ignored); returns how many were removed.
  int64_t remove(int64_t n, const int64_t* ids);
  bool contains(int64_t id) const;

  // queries: (nq, dim) row-major in query_dtype; scores, ids: (nq, k) outputs.
  // NaN or infinite queries are refused. Thread-safe against other searches.
  void search(int64_t nq, const void* queries, DType query_dtype, int64_t k, float* scores,
              int64_t* ids, const AllowList& allow = AllowList(),
              const SearchOptions& options = SearchOptions()) const;

  // Versioned file (see docs in io.cpp): written to path + ".tmp" and renamed into place.
  void save(const std::string& path) const;
  // Maps the file (mmap); verify = true checks the payload checksum (reads the whole file once).
  // The mapped vectors are copied only when the index is changed (add / remove).
  static FlatIndex load(const std::string& path, bool verify = true);

  const void* vectors() const;  // (size, dim) in dtype(), valid until the next add / remove
  const int64_t* ids() const;   // (size)

  struct Impl;

 private:
  explicit FlatIndex(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class CudaFlatIndex;
};

// The same index searched on one CUDA device. A host copy (a FlatIndex) stays the master: add and
// remove change it and mark the device copy stale; search uploads what is stale, then runs a fused
// matrix-product + top-k on the caller's stream. Vectors are kept on the device in shards; when
// the index is larger than max_device_bytes, the remaining shards are streamed through a staging
// buffer shard by shard and the per-shard results merged. k may be up to 4096.
class CudaFlatIndex {
 public:
  struct Options {
    int device = 0;
    int64_t shard_rows = 0;         // rows per device shard; 0 = about 1 GiB of vectors
    int64_t max_device_bytes = -1;  // resident vectors budget; -1 = 80% of free memory
    int64_t workspace_bytes = int64_t(1) << 30;  // candidate buffers, allocated once and reused
  };
  static constexpr int64_t kMaxK = 4096;

  CudaFlatIndex(int64_t dim, DType dtype, const Options& options);
  CudaFlatIndex(FlatIndex&& host, const Options& options);  // takes over a host index
  ~CudaFlatIndex();
  CudaFlatIndex(const CudaFlatIndex&) = delete;
  CudaFlatIndex& operator=(const CudaFlatIndex&) = delete;

  static bool built();      // compiled with CUDA
  static int device_count();  // 0 when not built or no device / driver

  int device() const;
  int64_t dim() const;
  DType dtype() const;
  int64_t size() const;
  const FlatIndex& host() const;

  // vectors and ids are host pointers (vectors_on_device = false) or device pointers on device().
  void add(int64_t n, const void* vectors, DType src_dtype, const int64_t* ids = nullptr,
           int64_t* assigned_ids = nullptr, bool vectors_on_device = false);
  int64_t remove(int64_t n, const int64_t* host_ids);

  // queries (nq, dim) in dtype(), scores / ids (nq, k) and allow.data: device pointers on device().
  // stream: a cudaStream_t (nullptr = legacy default stream). Returns when the results are written
  // in stream order: the host waits on the stream once, at the end, to report non-finite queries
  // (and, in the rare case that a round overflowed its candidate slots, once more after a redo).
  void search(int64_t nq, const void* queries, int64_t k, float* scores, int64_t* ids,
              const AllowList& allow, void* stream);

  void save(const std::string& path) const;
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace clinvla
