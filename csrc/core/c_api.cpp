// The C API (clinvla.h): thin wrappers that turn clinvla::Error into a status and a per-thread
// message, so that no C++ exception ever crosses into C code.
#include "clinvla/clinvla.h"

#include <new>
#include <string>

#include "internal.hpp"

struct clinvla_index {
  clinvla::FlatIndex index;
};

struct clinvla_cuda_index {
  std::unique_ptr<clinvla::CudaFlatIndex> index;
};

namespace {

thread_local std::string g_last_error;

template <typename F>
clinvla_status guarded(F&& f) {
  try {
    f();
    g_last_error.clear();
    return CLINVLA_OK;
  } catch (const clinvla::Error& e) {
    g_last_error = e.what();
    return clinvla_status(int(e.code()));
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return CLINVLA_ERR_NOMEM;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return CLINVLA_ERR_INTERNAL;
  } catch (...) {
    g_last_error = "unknown error";
    return CLINVLA_ERR_INTERNAL;
  }
}

clinvla_status null_arg(const char* what) {
  g_last_error = std::string(what) + " is a null pointer";
  return CLINVLA_ERR_INVALID;
}

clinvla::AllowList to_allow(const clinvla_allow* a) {
  clinvla::AllowList out;
  if (a) {
    out.data = a->data;
    out.n_ids = a->n_ids;
    out.stride_bytes = a->stride_bytes;
    out.packed = a->packed != 0;
  }
  return out;
}

}  // namespace

namespace clinvla {
namespace detail {
// libclinvla's C functions (engine, tokenizer, DICOM, view rules) report through the same string.
void set_last_error(const std::string& message) { g_last_error = message; }
}  // namespace detail
}  // namespace clinvla

extern "C" {

const char* clinvla_version(void) { return clinvla::version(); }
const char* clinvla_last_error(void) { return g_last_error.c_str(); }
const char* clinvla_cpu_isa(void) { return clinvla::cpu_isa(); }
uint32_t clinvla_crc32c(const void* data, size_t n, uint32_t crc) {
  return clinvla::detail::crc32c_update(crc, data, n);
}

clinvla_status clinvla_index_create(int64_t dim, clinvla_dtype dtype, clinvla_index** out) {
  if (!out) return null_arg("out");
  *out = nullptr;
  return guarded([&] { *out = new clinvla_index{clinvla::FlatIndex(dim, clinvla::DType(dtype))}; });
}

void clinvla_index_free(clinvla_index* index) { delete index; }
int64_t clinvla_index_size(const clinvla_index* index) { return index ? index->index.size() : 0; }
int64_t clinvla_index_dim(const clinvla_index* index) { return index ? index->index.dim() : 0; }
clinvla_dtype clinvla_index_dtype(const clinvla_index* index) {
  return index ? clinvla_dtype(index->index.dtype()) : CLINVLA_FLOAT32;
}

clinvla_status clinvla_index_add(clinvla_index* index, int64_t n, const void* vectors, clinvla_dtype src_dtype,
                                 const int64_t* ids, int64_t* assigned_ids) {
  if (!index) return null_arg("index");
  return guarded([&] { index->index.add(n, vectors, clinvla::DType(src_dtype), ids, assigned_ids); });
}

clinvla_status clinvla_index_remove(clinvla_index* index, int64_t n, const int64_t* ids, int64_t* removed) {
  if (!index) return null_arg("index");
  return guarded([&] {
    const int64_t r = index->index.remove(n, ids);
    if (removed) *removed = r;
  });
}

clinvla_status clinvla_index_search(const clinvla_index* index, int64_t nq, const void* queries,
                                    clinvla_dtype query_dtype, int64_t k, const clinvla_allow* allow, float* scores,
                                    int64_t* ids) {
  if (!index) return null_arg("index");
  return guarded([&] {
    index->index.search(nq, queries, clinvla::DType(query_dtype), k, scores, ids, to_allow(allow));
  });
}

clinvla_status clinvla_index_save(const clinvla_index* index, const char* path) {
  if (!index) return null_arg("index");
  if (!path) return null_arg("path");
  return guarded([&] { index->index.save(path); });
}

clinvla_status clinvla_index_load(const char* path, int verify, clinvla_index** out) {
  if (!out) return null_arg("out");
  if (!path) return null_arg("path");
  *out = nullptr;
  return guarded([&] { *out = new clinvla_index{clinvla::FlatIndex::load(path, verify != 0)}; });
}

int clinvla_cuda_device_count(void) { return clinvla::CudaFlatIndex::device_count(); }

clinvla_status clinvla_cuda_index_create(const clinvla_index* host, int device, clinvla_cuda_index** out) {
  if (!out) return null_arg("out");
  if (!host) return null_arg("host");
  *out = nullptr;
  return guarded([&] {
    // The device index keeps its own host copy (the master for add / remove).
    const clinvla::FlatIndex& h = host->index;
    clinvla::FlatIndex copy(h.dim(), h.dtype());
    copy.add(h.size(), h.vectors(), h.dtype(), h.ids());
    clinvla::CudaFlatIndex::Options opt;
    opt.device = device;
    auto idx = std::make_unique<clinvla::CudaFlatIndex>(std::move(copy), opt);
    *out = new clinvla_cuda_index{std::move(idx)};
  });
}

void clinvla_cuda_index_free(clinvla_cuda_index* index) { delete index; }

clinvla_status clinvla_cuda_index_search(clinvla_cuda_index* index, int64_t nq, const void* queries, int64_t k,
                                         const clinvla_allow* allow, float* scores, int64_t* ids, void* stream) {
  if (!index) return null_arg("index");
  return guarded([&] { index->index->search(nq, queries, k, scores, ids, to_allow(allow), stream); });
}

}  // extern "C"
