// FlatIndex: storage, add / remove by id, and the multi-threaded search driver.
//
// search(): the database is split into row blocks handed out to OpenMP threads (dynamic schedule,
// so a core taken by another process does not stall the rest); each thread scans its blocks with
// the CPU kernel (scan_impl.hpp) into its own per-query bounded heaps; the heaps of all threads
// are then merged per query and sorted (score descending, then id ascending). Queries are handled
// in chunks so the packed query panels stay in L2 and the heaps within a fixed memory budget.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "flat_index_impl.hpp"
#include "scan.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace clinvla {

using detail::fail;

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

const char* version() { return "0.1.0"; }

namespace detail {

std::string with_commas(uint64_t v) {
  std::string s = std::to_string(v);
  for (int i = int(s.size()) - 3; i > 0; i -= 3) s.insert(size_t(i), ",");
  return s;
}

void AlignedBuffer::reserve(size_t bytes) {
  if (bytes <= cap_) return;
  void* p = nullptr;
  const size_t rounded = (bytes + 63) & ~size_t(63);
  if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0 || !p)
    fail(ErrorCode::OutOfMemory, "out of memory allocating ", with_commas(bytes), " bytes");
  if (size_) std::memcpy(p, ptr_, size_);
  std::free(ptr_);
  ptr_ = static_cast<uint8_t*>(p);
  cap_ = rounded;
}

void AlignedBuffer::grow_to(size_t bytes) {
  if (bytes > cap_) reserve(std::max(bytes, cap_ + cap_ / 2));
  size_ = bytes;
}

}  // namespace detail

void FlatIndex::Impl::make_owned() {
  if (!mapping) return;
  vec_owned.resize(size_t(count) * row_bytes());
  id_owned.resize(size_t(count) * sizeof(int64_t));
  if (count) {
    std::memcpy(vec_owned.data(), vec_ptr, size_t(count) * row_bytes());
    std::memcpy(id_owned.data(), id_ptr, size_t(count) * sizeof(int64_t));
  }
  mapping.reset();
  vec_ptr = vec_owned.data();
  id_ptr = reinterpret_cast<const int64_t*>(id_owned.data());
}

std::unordered_map<int64_t, int64_t>& FlatIndex::Impl::id_map() const {
  if (!rows_by_id) {
    auto m = std::make_unique<std::unordered_map<int64_t, int64_t>>();
    m->reserve(size_t(count));
    for (int64_t r = 0; r < count; ++r) m->emplace(id_ptr[r], r);
    rows_by_id = std::move(m);
  }
  return *rows_by_id;
}

FlatIndex::FlatIndex(int64_t dim, DType dtype) : impl_(std::make_unique<Impl>()) {
  if (dim < 1 || dim > (int64_t(1) << 24)) fail(ErrorCode::Invalid, "dim must be between 1 and 16777216, got ", dim);
  if (!detail::valid_dtype(int32_t(dtype)))
    fail(ErrorCode::Invalid, "dtype must be float32, float16 or bfloat16, got code ", int32_t(dtype));
  impl_->dim = dim;
  impl_->dtype = dtype;
  impl_->elem = dtype_size(dtype);
}

FlatIndex::FlatIndex(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FlatIndex::~FlatIndex() = default;
FlatIndex::FlatIndex(FlatIndex&&) noexcept = default;
FlatIndex& FlatIndex::operator=(FlatIndex&&) noexcept = default;

int64_t FlatIndex::dim() const { return impl_->dim; }
DType FlatIndex::dtype() const { return impl_->dtype; }
int64_t FlatIndex::size() const { std::shared_lock<std::shared_mutex> l(impl_->mu); return impl_->count; }
int64_t FlatIndex::next_id() const { std::shared_lock<std::shared_mutex> l(impl_->mu); return impl_->next_id; }
const void* FlatIndex::vectors() const { return impl_->vec_ptr; }
const int64_t* FlatIndex::ids() const { return impl_->id_ptr; }

void FlatIndex::add(int64_t n, const void* vectors, DType src_dtype, const int64_t* ids, int64_t* assigned_ids) {
  Impl& m = *impl_;
  std::unique_lock<std::shared_mutex> lock(m.mu);
  if (n < 0) fail(ErrorCode::Invalid, "add: the number of vectors must be >= 0, got ", n);
  if (!detail::valid_dtype(int32_t(src_dtype)))
    fail(ErrorCode::Invalid, "add: vectors must be float32, float16 or bfloat16, got dtype code ", int32_t(src_dtype));
  if (n == 0) return;
  if (!vectors) fail(ErrorCode::Invalid, "add: vectors is a null pointer for ", n, " vectors");

  // Ids: validated (>= 0, new, distinct) before anything changes.
  std::vector<int64_t> inserted;
  int64_t max_id = m.next_id - 1;
  if (ids) {
    auto& map = m.id_map();
    inserted.reserve(size_t(n));
    auto rollback = [&] { for (int64_t id : inserted) map.erase(id); };
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[i];
      if (id < 0) { rollback(); fail(ErrorCode::Invalid, "add: ids must be >= 0 (-1 marks a missing result), got ids[", i, "] = ", id); }
      if (id == std::numeric_limits<int64_t>::max()) { rollback(); fail(ErrorCode::Invalid, "add: ids[", i, "] = ", id, " is reserved"); }
      if (!map.emplace(id, m.count + i).second) {
        rollback();
        fail(ErrorCode::Invalid, "add: id ", id, " (ids[", i, "]) is already in the index or repeated in this call");
      }
      inserted.push_back(id);
      max_id = std::max(max_id, id);
    }
  } else if (m.next_id > std::numeric_limits<int64_t>::max() - n) {
    fail(ErrorCode::Invalid, "add: sequential ids would overflow int64");
  }

  try {
    m.make_owned();
    const size_t rb = m.row_bytes();
    const size_t old_vec = size_t(m.count) * rb;
    m.vec_owned.grow_to(old_vec + size_t(n) * rb);
    m.id_owned.grow_to(size_t(m.count + n) * sizeof(int64_t));
    m.vec_ptr = m.vec_owned.data();
    m.id_ptr = reinterpret_cast<const int64_t*>(m.id_owned.data());
    const int64_t bad = detail::kernels().convert(src_dtype, m.dtype, vectors, m.vec_owned.data() + old_vec, n * m.dim);
    if (bad >= 0) {
      m.vec_owned.resize(old_vec);
      m.id_owned.resize(size_t(m.count) * sizeof(int64_t));
      const float v = detail::load_as_float(src_dtype, vectors, bad);
      fail(ErrorCode::Invalid, "add: vectors must be finite and representable in ", dtype_name(m.dtype),
           ": vector ", bad / m.dim, " has ", v, " at dimension ", bad % m.dim);
    }
  } catch (...) {
    if (ids && m.rows_by_id) for (int64_t id : inserted) m.rows_by_id->erase(id);
    throw;
  }

  int64_t* out_ids = reinterpret_cast<int64_t*>(m.id_owned.data()) + m.count;
  if (ids) {
    std::memcpy(out_ids, ids, size_t(n) * sizeof(int64_t));
    m.next_id = max_id + 1;
  } else {
    for (int64_t i = 0; i < n; ++i) out_ids[i] = m.next_id + i;
    if (m.rows_by_id) for (int64_t i = 0; i < n; ++i) m.rows_by_id->emplace(m.next_id + i, m.count + i);
    m.next_id += n;
  }
  if (assigned_ids) std::memcpy(assigned_ids, out_ids, size_t(n) * sizeof(int64_t));
  m.count += n;
}

int64_t FlatIndex::remove(int64_t n, const int64_t* ids) {
  Impl& m = *impl_;
  std::unique_lock<std::shared_mutex> lock(m.mu);
  if (n < 0) fail(ErrorCode::Invalid, "remove: the number of ids must be >= 0, got ", n);
  if (n == 0) return 0;
  if (!ids) fail(ErrorCode::Invalid, "remove: ids is a null pointer for ", n, " ids");
  auto& map = m.id_map();
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < n; ++i) {
    auto it = map.find(ids[i]);
    if (it != map.end()) rows.push_back(it->second);
  }
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  if (rows.empty()) return 0;
  m.make_owned();
  // Stable compaction from the first removed row: later rows keep their order.
  const size_t rb = m.row_bytes();
  uint8_t* vec = m.vec_owned.data();
  int64_t* idv = reinterpret_cast<int64_t*>(m.id_owned.data());
  int64_t write = rows[0];
  size_t next = 0;
  for (int64_t r = rows[0]; r < m.count; ++r) {
    if (next < rows.size() && rows[next] == r) { ++next; continue; }
    std::memmove(vec + size_t(write) * rb, vec + size_t(r) * rb, rb);
    idv[write] = idv[r];
    ++write;
  }
  const int64_t removed = int64_t(rows.size());
  m.count -= removed;
  m.vec_owned.resize(size_t(m.count) * rb);
  m.id_owned.resize(size_t(m.count) * sizeof(int64_t));
  m.rows_by_id.reset();  // rows moved: rebuilt on next use
  return removed;
}

bool FlatIndex::contains(int64_t id) const {
  std::shared_lock<std::shared_mutex> lock(impl_->mu);
  std::lock_guard<std::mutex> guard(impl_->map_mu);
  const auto& map = impl_->id_map();
  return map.find(id) != map.end();
}

namespace {

struct Result {
  float score;
  int64_t id;
};

inline bool better(const Result& a, const Result& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

void FlatIndex::search(int64_t nq, const void* queries, DType query_dtype, int64_t k, float* scores, int64_t* ids,
                       const AllowList& allow, const SearchOptions& options) const {
  const Impl& m = *impl_;
  std::shared_lock<std::shared_mutex> lock(m.mu);
  if (nq < 0) fail(ErrorCode::Invalid, "search: the number of queries must be >= 0, got ", nq);
  if (k < 0 || k > kMaxK) fail(ErrorCode::Invalid, "search: k must be between 0 and ", kMaxK, ", got ", k);
  if (!detail::valid_dtype(int32_t(query_dtype)))
    fail(ErrorCode::Invalid, "search: queries must be float32, float16 or bfloat16, got dtype code ", int32_t(query_dtype));
  if (nq == 0) return;
  if (!queries) fail(ErrorCode::Invalid, "search: queries is a null pointer for ", nq, " queries");
  if (allow.data && (allow.n_ids < 0 || allow.stride_bytes < 0))
    fail(ErrorCode::Invalid, "search: allow-list n_ids and stride_bytes must be >= 0, got ", allow.n_ids, " and ",
         allow.stride_bytes);
  const detail::KernelTable& kt = detail::kernels();
  const int64_t dim = m.dim;

  // Queries to float32, refusing NaN / inf (they would make the order meaningless).
  std::vector<float> qf(size_t(nq * dim));
  const int64_t bad = kt.convert(query_dtype, DType::Float32, queries, qf.data(), nq * dim);
  if (bad >= 0)
    fail(ErrorCode::Invalid, "search: queries must be finite, but query ", bad / dim, " has ", qf[size_t(bad)],
         " at dimension ", bad % dim);
  if (k == 0) return;
  if (!scores || !ids) fail(ErrorCode::Invalid, "search: scores / ids output is a null pointer");
  std::fill(scores, scores + nq * k, -std::numeric_limits<float>::infinity());
  std::fill(ids, ids + nq * k, int64_t(-1));
  const int64_t N = m.count;
  if (N == 0) return;

  const int64_t kk = std::min(k, N);
  int threads = options.num_threads > 0 ? options.num_threads : max_threads();
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, (N + 4095) / 4096)));

  // Query chunk: packed panels stay in L2 (~512 KiB) and all threads' heaps within ~256 MiB.
  const int64_t cache_q = std::max<int64_t>(64, (int64_t(512) << 10) / (dim * 4));
  const int64_t heap_q = std::max<int64_t>(1, (int64_t(256) << 20) / (int64_t(threads) * kk * 12));
  const int64_t qchunk = std::max<int64_t>(1, std::min({nq, cache_q, heap_q}));

  const int64_t block = std::max<int64_t>(256, std::min<int64_t>(32768, ((N / (int64_t(threads) * 16)) + 31) / 32 * 32));
  const int64_t nblocks = (N + block - 1) / block;
  const int64_t scratch_n = kt.scratch_floats(dim);

  std::vector<float> panels;
  std::vector<float> heap_scores(size_t(threads) * size_t(qchunk) * size_t(kk));
  std::vector<int64_t> heap_ids(size_t(threads) * size_t(qchunk) * size_t(kk));
  std::vector<int64_t> heap_sizes(size_t(threads) * size_t(qchunk));
  const int64_t thresh_len = qchunk + 64;
  std::vector<float> thresh(size_t(threads) * size_t(thresh_len));
  std::vector<float> scratch(size_t(threads) * size_t(scratch_n) + 16);
  std::vector<Result> merge_buf(size_t(threads) * size_t(threads) * size_t(kk));

  for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
    const int64_t nqc = std::min(qchunk, nq - q0);
    const int pw = kt.panel_width(nqc);
    if (pw) {
      const int64_t np = (nqc + pw - 1) / pw;
      panels.assign(size_t(np * dim * pw), 0.f);
      for (int64_t q = 0; q < nqc; ++q) {
        const float* src = qf.data() + (q0 + q) * dim;
        float* dst = panels.data() + (q / pw) * dim * pw + (q % pw);
        for (int64_t d = 0; d < dim; ++d) dst[d * pw] = src[d];
      }
    }
    std::vector<detail::Heaps> heaps(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      detail::Heaps& h = heaps[size_t(t)];
      h.scores = heap_scores.data() + size_t(t) * size_t(qchunk * kk);
      h.ids = heap_ids.data() + size_t(t) * size_t(qchunk * kk);
      h.sizes = heap_sizes.data() + size_t(t) * size_t(qchunk);
      h.thresh = thresh.data() + size_t(t) * size_t(thresh_len);
      h.cap = kk;
      std::fill(h.sizes, h.sizes + nqc, int64_t(0));
      std::fill(h.thresh, h.thresh + nqc, -std::numeric_limits<float>::infinity());
      std::fill(h.thresh + nqc, h.thresh + thresh_len, std::numeric_limits<float>::infinity());
    }
    detail::ScanJob job;
    job.base = m.vec_ptr;
    job.dtype = m.dtype;
    job.dim = dim;
    job.ids = m.id_ptr;
    job.queries = qf.data() + q0 * dim;
    job.panels = pw ? panels.data() : nullptr;
    job.nq = nqc;
    job.panel = pw;
    job.allow = allow;
    if (allow.data) job.allow.data = allow.data + q0 * allow.stride_bytes;

#pragma omp parallel num_threads(threads)
    {
      const int t = thread_id();
      float* scr = scratch.data() + size_t(t) * size_t(scratch_n);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nblocks; ++b) {
        kt.scan(job, b * block, std::min(N, (b + 1) * block), heaps[size_t(t)], scr);
      }
    }

    // Merge the threads' heaps per query and sort the k best.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
    for (int64_t q = 0; q < nqc; ++q) {
      Result* buf = merge_buf.data() + size_t(thread_id()) * size_t(threads) * size_t(kk);
      int64_t n = 0;
      for (int t = 0; t < threads; ++t) {
        const detail::Heaps& h = heaps[size_t(t)];
        for (int64_t j = 0; j < h.sizes[q]; ++j) buf[n++] = Result{h.scores[q * kk + j], h.ids[q * kk + j]};
      }
      const int64_t take = std::min(n, kk);
      std::partial_sort(buf, buf + take, buf + n, better);
      float* os = scores + (q0 + q) * k;
      int64_t* oi = ids + (q0 + q) * k;
      for (int64_t j = 0; j < take; ++j) { os[j] = buf[j].score; oi[j] = buf[j].id; }
    }
  }
}

}  // namespace clinvla
