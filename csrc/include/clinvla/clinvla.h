/* ClinVLA exact top-k retrieval: the C API (for C, C++ and PACS plug-ins such as Orthanc's).
 *
 * Every function returns CLINVLA_OK (0) or an error status; clinvla_last_error() then gives a
 * message for the calling thread that names what was expected and what was given. Buffers are
 * caller-owned, row-major and contiguous. Results of a search are sorted by score descending,
 * ties broken by the smaller id; missing slots hold id -1 and score -inf.
 *
 *   clinvla_index* index = NULL;
 *   if (clinvla_index_create(128, CLINVLA_FLOAT16, &index) != CLINVLA_OK) puts(clinvla_last_error());
 *   clinvla_index_add(index, n, vectors, CLINVLA_FLOAT32, NULL, NULL);
 *   clinvla_index_search(index, nq, queries, CLINVLA_FLOAT16, k, NULL, scores, ids);
 *   clinvla_index_save(index, "archive.clvx");
 *   clinvla_index_free(index);
 */
#ifndef CLINVLA_CLINVLA_H_
#define CLINVLA_CLINVLA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CLINVLA_API __attribute__((visibility("default")))
#else
#define CLINVLA_API
#endif

typedef enum clinvla_dtype {
  CLINVLA_FLOAT32 = 0,
  CLINVLA_FLOAT16 = 1,
  CLINVLA_BFLOAT16 = 2
} clinvla_dtype;

typedef enum clinvla_status {
  CLINVLA_OK = 0,
  CLINVLA_ERR_INVALID = 1,
  CLINVLA_ERR_IO = 2,
  CLINVLA_ERR_FORMAT = 3,
  CLINVLA_ERR_NOMEM = 4,
  CLINVLA_ERR_UNSUPPORTED = 5,
  CLINVLA_ERR_CUDA = 6,
  CLINVLA_ERR_INTERNAL = 7
} clinvla_status;

/* An allow-list (see clinvla::AllowList): packed = 1 reads bit (id % 8) of data[id / 8],
 * packed = 0 one byte per id; ids >= n_ids are not allowed; stride_bytes = 0 shares the list
 * between queries, otherwise query i reads data + i * stride_bytes. */
typedef struct clinvla_allow {
  const uint8_t* data;
  int64_t n_ids;
  int64_t stride_bytes;
  int32_t packed;
} clinvla_allow;

typedef struct clinvla_index clinvla_index;           /* host (CPU) index */
typedef struct clinvla_cuda_index clinvla_cuda_index; /* the same, searched on a GPU */

CLINVLA_API const char* clinvla_version(void);
CLINVLA_API const char* clinvla_last_error(void);
CLINVLA_API const char* clinvla_cpu_isa(void);
/* CRC-32C (Castagnoli) of n bytes, continuing from crc (0 to start): the file checksum. */
CLINVLA_API uint32_t clinvla_crc32c(const void* data, size_t n, uint32_t crc);

CLINVLA_API clinvla_status clinvla_index_create(int64_t dim, clinvla_dtype dtype, clinvla_index** out);
CLINVLA_API void clinvla_index_free(clinvla_index* index);
CLINVLA_API int64_t clinvla_index_size(const clinvla_index* index);
CLINVLA_API int64_t clinvla_index_dim(const clinvla_index* index);
CLINVLA_API clinvla_dtype clinvla_index_dtype(const clinvla_index* index);

/* vectors: (n, dim) in src_dtype; ids: n new distinct ids >= 0 or NULL (sequential);
 * assigned_ids: NULL or (n) receiving the ids given. */
CLINVLA_API clinvla_status clinvla_index_add(clinvla_index* index, int64_t n, const void* vectors,
                                             clinvla_dtype src_dtype, const int64_t* ids,
                                             int64_t* assigned_ids);
/* removed: NULL or receives the number of ids that were present. */
CLINVLA_API clinvla_status clinvla_index_remove(clinvla_index* index, int64_t n, const int64_t* ids,
                                                int64_t* removed);
/* queries: (nq, dim) in query_dtype; allow: NULL for all ids; scores, ids: (nq, k). */
CLINVLA_API clinvla_status clinvla_index_search(const clinvla_index* index, int64_t nq,
                                                const void* queries, clinvla_dtype query_dtype,
                                                int64_t k, const clinvla_allow* allow, float* scores,
                                                int64_t* ids);
CLINVLA_API clinvla_status clinvla_index_save(const clinvla_index* index, const char* path);
/* verify != 0 checks the payload checksum at load. */
CLINVLA_API clinvla_status clinvla_index_load(const char* path, int verify, clinvla_index** out);

/* CUDA: CLINVLA_ERR_UNSUPPORTED when the library was built without CUDA. The host index is
 * copied; queries, scores, ids and allow->data are device pointers; stream is a cudaStream_t. */
CLINVLA_API int clinvla_cuda_device_count(void);
CLINVLA_API clinvla_status clinvla_cuda_index_create(const clinvla_index* host, int device,
                                                     clinvla_cuda_index** out);
CLINVLA_API void clinvla_cuda_index_free(clinvla_cuda_index* index);
CLINVLA_API clinvla_status clinvla_cuda_index_search(clinvla_cuda_index* index, int64_t nq,
                                                     const void* queries, int64_t k,
                                                     const clinvla_allow* allow, float* scores,
                                                     int64_t* ids, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* CLINVLA_CLINVLA_H_ */
