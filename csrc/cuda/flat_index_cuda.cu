// CudaFlatIndex: exact top-k on one GPU, a fused matrix product + threshold filter, then merges.
//
// Maths. For queries Q (nq, D) and stored vectors X (N, D): S = Q X^T, and for each query the k
// largest S[q, :] with ties broken by the smaller id (the CPU path's rule). S is never written whole:
//
//   round 0  ("dense"): the first L0 <= cap rows; the scan writes their scores, cand[q, 0:L0].
//   round r  ("filtered"): the next L_r rows; the scan keeps a score only when it is >= tau[q],
//            the k-th best score found so far, appending it to cand[q, :] (capacity cap).
//   after every round, select() merges cand[q] into the running top-k (kept in the caller's
//   output arrays) with a 4-pass radix select on the scores (and, only when equal scores straddle
//   the k-th place, an 8-pass radix select on the ids), then a bitonic sort of the k winners;
//   tau[q] becomes the new k-th score.
//
// Any k-th best of a subset is <= the true k-th best, so every vector of the true top-k passes the
// filter: the result is exact. Round lengths grow so that about k * L / processed <= cap / 4
// candidates are expected (random order). A round that overflows cap raises a sticky device flag
// and the search goes on without waiting; the host reads the flag once, at the end (with the
// non-finite-query check), and only then, rarely, redoes the search with rounds of <= cap rows,
// which cannot overflow (each row adds at most one candidate per query). So a search is one
// memset, one query check, 2 launches per round and one stream synchronise; nothing in between
// waits for the host.
//
// The scan: 4 warps per CTA, 128 database rows per tile, D walked in chunks of 64 through shared
// memory; float16 / bfloat16 use tensor cores (WMMA m16n16k16, float accumulate), float32 uses
// FFMA. Two launch shapes:
//   grid     one CTA per (64 or 16 queries) x (128 rows) tile: few rows (the dense round, or
//            too few tiles to fill the GPU otherwise), float32, or D too large for the next one;
//   resident one CTA per 128-row tile that loops over every 64-query block with the tile kept in
//            shared memory (half types, more than 64 queries, enough tiles): the database crosses
//            L2 -> SM once per search instead of ceil(nq / 64) times.
// Offsets are int64 wherever rows * dim can pass 2^31. Vectors live on the device in shards;
// shards beyond the memory budget are copied in through one staging buffer when searched. All work
// is on the caller's stream; buffers are allocated on first need and reused.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/internal.hpp"

namespace clinvla {

using detail::fail;

namespace {

#define CLV_CUDA(call)                                                                              \
  do {                                                                                              \
    cudaError_t err_ = (call);                                                                      \
    if (err_ != cudaSuccess) {                                                                      \
      cudaGetLastError();                                                                           \
      detail::fail(ErrorCode::Cuda, #call " failed: ", cudaGetErrorString(err_), " (", __FILE__, ":", \
                   __LINE__, ")");                                                                  \
    }                                                                                               \
  } while (0)

constexpr int kThreads = 128;  // 4 warps per scan CTA
constexpr int kBN = 128;       // rows per scan tile
constexpr int kBK = 64;        // dimensions per shared-memory chunk (half types)
constexpr int kBKf = 16;       // ... float32
constexpr int kSelectThreads = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct DeviceAllow {
  const uint8_t* data;
  int64_t n_ids;
  int64_t stride;
  int packed;
};

__device__ __forceinline__ bool is_allowed(const DeviceAllow& a, int64_t q, int64_t id) {
  if (a.data == nullptr) return true;
  if (id < 0 || id >= a.n_ids) return false;
  const uint8_t* bits = a.data + q * a.stride;
  return a.packed ? ((bits[id >> 3] >> (id & 7)) & 1) != 0 : bits[id] != 0;
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T zero_val();
template <> __device__ __forceinline__ __half zero_val<__half>() { return __float2half(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_val<__nv_bfloat16>() { return __float2bfloat16(0.f); }

struct ScanParams {
  const void* queries;  // (nq, dim) in T
  const void* vectors;  // shard rows (rows, dim) in T
  const int64_t* ids;   // shard ids (rows)
  int64_t nq, dim;
  int64_t r0, r_end;    // rows of this round within the shard
  float* cand_s;        // (nq, cap)
  uint32_t* cand_r;     // (nq, cap) row - r0 (filtered rounds)
  int* counts;          // (nq)
  const float* tau;     // (nq)
  int* overflow;
  int64_t cap;
  int64_t n_qblocks;
  int64_t tile0;        // first tile of this launch (ranges longer than one grid)
  DeviceAllow allow;
  bool vec16;           // 16-byte loads are safe (dim % 8 == 0, aligned pointers)
};

// Shared memory: the staging tiles and the score tile are never live at the same time.
template <typename T, int BQ>
struct ScanSmem {
  static constexpr int kLdT = kBK + 8;     // halves per staged row (+16 B against bank conflicts)
  static constexpr int kLdS = kBN + 4;     // floats per score row
  static constexpr int kTiles = (BQ + kBN) * kLdT * 2;
  static constexpr int kTilesF = kBKf * ((BQ + 4) + (kBN + 4)) * 4;
  static constexpr int kScores = BQ * kLdS * 4;
  static constexpr int kBytes = (kScores > kTiles ? (kScores > kTilesF ? kScores : kTilesF)
                                                  : (kTiles > kTilesF ? kTiles : kTilesF));
};

// ---- tile products: write S[BQ][kLdS] (float) in shared memory ----

// XRES = false: the 128 database rows are staged chunk by chunk with the queries (grid shape).
// XRES = true: they are already in shared memory at xres, all of D, ldx elements per row
// (resident shape), and only the queries are staged.
//
// 16-byte staging loads go in batches per thread, all issued before any is stored: one load in
// flight per thread (load, branch, store, repeat: what the loop compiled to before) keeps a Q = 1
// scan far below HBM bandwidth (~14 KB in flight per SM); 8 x 16 B per thread x 128 threads x
// 8 CTAs per SM (64 registers) does not. The 64-query tile, which holds 64 accumulator registers,
// takes 4 at a time so that it stays near 128 registers (unrolled batches: 212-254 registers).
template <int BQ> __host__ __device__ constexpr int load_batch() { return BQ <= 16 ? 8 : 4; }

template <typename T, int BQ, bool XRES>
__device__ void tile_scores_mma(const ScanParams& p, int64_t q0, int64_t row0, unsigned char* smem,
                                const T* xres, int ldx) {
  using namespace nvcuda;
  using Smem = ScanSmem<T, BQ>;
  constexpr int LdT = Smem::kLdT;
  T* qs = reinterpret_cast<T*>(smem);
  T* xs = qs + BQ * LdT;
  constexpr int staged_rows = XRES ? BQ : BQ + kBN;
  const T* Q = static_cast<const T*>(p.queries);
  const T* X = static_cast<const T*>(p.vectors);
  const int warp = threadIdx.x / 32;
  constexpr int FQ = BQ / 16;  // fragments along queries; each warp owns 32 rows (2 fragments)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FQ][2];
#pragma unroll
  for (int i = 0; i < FQ; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < p.dim; k0 += kBK) {
    if (p.vec16) {
      constexpr int kChunks = kBK / 8;  // 16-byte chunks per staged row
      constexpr int kIters = staged_rows * kChunks / kThreads;
      static_assert(staged_rows * kChunks % kThreads == 0, "staging: whole iterations per thread");
      constexpr int kBatch = load_batch<XRES ? 64 : BQ>();
      // Not unrolled: ptxas would hoist every batch's loads to the top (12 x 4 registers more).
#pragma unroll 1
      for (int b0 = 0; b0 < kIters; b0 += kBatch) {
        uint4 v[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          v[j] = make_uint4(0, 0, 0, 0);
          if (b0 + j >= kIters) continue;
          const int idx = threadIdx.x + (b0 + j) * kThreads;
          const int r = idx / kChunks, c = (idx % kChunks) * 8;
          const int64_t k = k0 + c;
          if (r < BQ) {
            const int64_t q = q0 + r;
            if (q < p.nq && k < p.dim) v[j] = *reinterpret_cast<const uint4*>(Q + q * p.dim + k);
          } else {
            const int64_t row = row0 + (r - BQ);
            if (row < p.r_end && k < p.dim) v[j] = __ldg(reinterpret_cast<const uint4*>(X + row * p.dim + k));
          }
        }
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          if (b0 + j >= kIters) continue;
          const int idx = threadIdx.x + (b0 + j) * kThreads;
          const int r = idx / kChunks, c = (idx % kChunks) * 8;
          T* dst = r < BQ ? qs + r * LdT + c : xs + (r - BQ) * LdT + c;
          *reinterpret_cast<uint4*>(dst) = v[j];
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < staged_rows * kBK; idx += kThreads) {
        const int r = idx / kBK, c = idx % kBK;
        const int64_t k = k0 + c;
        T v = zero_val<T>();
        if (r < BQ) {
          const int64_t q = q0 + r;
          if (q < p.nq && k < p.dim) v = Q[q * p.dim + k];
          qs[r * LdT + c] = v;
        } else {
          const int64_t row = row0 + (r - BQ);
          if (row < p.r_end && k < p.dim) v = X[row * p.dim + k];
          xs[(r - BQ) * LdT + c] = v;
        }
      }
    }
    __syncthreads();
    // B operand: this chunk of the warp's 32 rows, from the staging tile or the resident tile.
    const T* xb = XRES ? xres + k0 : xs;
    const int ldb = XRES ? ldx : LdT;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], xb + (warp * 32 + j * 16) * ldb + kk, ldb);
#pragma unroll
      for (int i = 0; i < FQ; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, qs + (i * 16) * LdT + kk, LdT);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  float* S = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < FQ; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(S + (i * 16) * Smem::kLdS + warp * 32 + j * 16, acc[i][j], Smem::kLdS,
                              wmma::mem_row_major);
  __syncthreads();
}

// FFMA path: float32 storage, and bfloat16 on GPUs without bf16 tensor cores (sm < 80).
template <typename T, int BQ>
__device__ void tile_scores_simt(const ScanParams& p, int64_t q0, int64_t row0, unsigned char* smem) {
  using Smem = ScanSmem<T, BQ>;
  constexpr int LdQ = BQ + 4, LdX = kBN + 4;
  constexpr int TQ = BQ / 8;  // queries per thread; 8 x 16 threads, 8 rows per thread
  float* qs = reinterpret_cast<float*>(smem);  // [kBKf][LdQ]  (transposed: k major)
  float* xs = qs + kBKf * LdQ;                 // [kBKf][LdX]
  const T* Q = static_cast<const T*>(p.queries);
  const T* X = static_cast<const T*>(p.vectors);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[TQ][8];
#pragma unroll
  for (int i = 0; i < TQ; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < p.dim; k0 += kBKf) {
    for (int idx = threadIdx.x; idx < (BQ + kBN) * kBKf; idx += kThreads) {
      const int r = idx / kBKf, c = idx % kBKf;
      const int64_t k = k0 + c;
      if (r < BQ) {
        const int64_t q = q0 + r;
        qs[c * LdQ + r] = (q < p.nq && k < p.dim) ? to_f<T>(Q[q * p.dim + k]) : 0.f;
      } else {
        const int64_t row = row0 + (r - BQ);
        xs[c * LdX + (r - BQ)] = (row < p.r_end && k < p.dim) ? to_f<T>(X[row * p.dim + k]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBKf; ++kk) {
      float a[TQ], b[8];
#pragma unroll
      for (int i = 0; i < TQ; ++i) a[i] = qs[kk * LdQ + ty * TQ + i];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = xs[kk * LdX + tx * 8 + j];
#pragma unroll
      for (int i = 0; i < TQ; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* S = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < TQ; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) S[(ty * TQ + i) * Smem::kLdS + tx * 8 + j] = acc[i][j];
  __syncthreads();
}

// ---- the fused scan ----

// The score tile S (BQ x 128, in shared memory) of queries q0.. against rows row0..: the dense
// round writes every score, a filtered round appends those >= tau (the caller has filled tau_s).
template <int BQ, bool DENSE>
__device__ __forceinline__ void emit_scores(const ScanParams& p, int64_t q0, int64_t row0, const float* S,
                                            const float* tau_s, int ldS) {
  for (int idx = threadIdx.x; idx < BQ * kBN; idx += kThreads) {
    const int i = idx / kBN, j = idx % kBN;
    const int64_t q = q0 + i, row = row0 + j;
    if (q >= p.nq || row >= p.r_end) continue;
    const float s = S[i * ldS + j];
    if (DENSE) {
      const bool ok = p.allow.data == nullptr || is_allowed(p.allow, q, p.ids[row]);
      p.cand_s[q * p.cap + (row - p.r0)] = ok ? s : kNegInf;
    } else if (s >= tau_s[i] && s > kNegInf) {
      if (p.allow.data != nullptr && !is_allowed(p.allow, q, p.ids[row])) continue;
      const int pos = atomicAdd(p.counts + q, 1);
      if (pos < p.cap) {
        p.cand_s[q * p.cap + pos] = s;
        p.cand_r[q * p.cap + pos] = uint32_t(row - p.r0);
      } else {
        *p.overflow = 1;  // sticky for the whole search; the host redoes it (see the top)
      }
    }
  }
}

template <typename T, int BQ, bool DENSE>
__global__ void __launch_bounds__(kThreads) scan_kernel(ScanParams p) {
  using Smem = ScanSmem<T, BQ>;
  __shared__ __align__(128) unsigned char smem[Smem::kBytes];
  __shared__ float tau_s[BQ];
  const int64_t qb = int64_t(blockIdx.x) % p.n_qblocks;
  const int64_t tile = int64_t(blockIdx.x) / p.n_qblocks;
  const int64_t q0 = qb * BQ;
  const int64_t row0 = p.r0 + (p.tile0 + tile) * kBN;
  if (!DENSE) {
    for (int i = threadIdx.x; i < BQ; i += kThreads) tau_s[i] = q0 + i < p.nq ? p.tau[q0 + i] : kNegInf;
  }
  // Each ends with __syncthreads, which also publishes tau_s.
  if constexpr (std::is_same<T, float>::value) {
    tile_scores_simt<float, BQ>(p, q0, row0, smem);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    tile_scores_simt<T, BQ>(p, q0, row0, smem);
#else
    tile_scores_mma<T, BQ, false>(p, q0, row0, smem, nullptr, 0);
#endif
  } else {
    tile_scores_mma<T, BQ, false>(p, q0, row0, smem, nullptr, 0);
  }
  emit_scores<BQ, DENSE>(p, q0, row0, reinterpret_cast<const float*>(smem), tau_s, Smem::kLdS);
}

// Resident shape (half types, tensor cores): dynamic shared memory = the tile's 128 rows x
// resident_ld(dim) elements, then the query staging / score area of the grid shape, then tau_s.
// (No static shared memory, so the dynamic area starts at the CTA's aligned shared-memory base:
// WMMA loads need 32-byte aligned rows.)
constexpr int kResidentBQ = 64;
// Two CTAs per SM: 2 x (dynamic + 1 KB the hardware reserves per CTA) must fit the SM's 228 KB
// (sm_90); above this the grid shape runs. D <= 256 fits for half types.
constexpr int kResidentMaxSmem = 112 * 1024;
static_assert(2 * (kResidentMaxSmem + 1024) <= 228 * 1024, "resident scan: two CTAs must fit one SM");

__host__ __device__ constexpr int64_t resident_ld(int64_t dim) { return (dim + kBK - 1) / kBK * kBK + 8; }

template <typename T>
__host__ __device__ constexpr int64_t resident_smem(int64_t dim) {
  return (int64_t(kBN) * resident_ld(dim) * int64_t(sizeof(T)) + 127) / 128 * 128 + ScanSmem<T, kResidentBQ>::kBytes +
         kResidentBQ * int64_t(sizeof(float));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kBf16Mma = false;  // no bf16 WMMA before sm_80; the host never picks this shape there
#else
constexpr bool kBf16Mma = true;
#endif

template <typename T, bool DENSE>
__global__ void __launch_bounds__(kThreads) scan_resident_kernel(ScanParams p) {
  constexpr int BQ = kResidentBQ;
  using Smem = ScanSmem<T, BQ>;
  extern __shared__ __align__(128) unsigned char dyn_scan[];
  if constexpr (std::is_same<T, __nv_bfloat16>::value && !kBf16Mma) {
    __trap();
  } else {
    const int ldx = int(resident_ld(p.dim));
    T* xres = reinterpret_cast<T*>(dyn_scan);
    unsigned char* work = dyn_scan + (int64_t(kBN) * ldx * int64_t(sizeof(T)) + 127) / 128 * 128;
    float* tau_s = reinterpret_cast<float*>(work + Smem::kBytes);  // [BQ]
    const T* X = static_cast<const T*>(p.vectors);
    const int64_t row0 = p.r0 + (p.tile0 + blockIdx.x) * kBN;
    const int64_t kpad = ldx - 8;  // columns dim..kpad are zero, so whole 64-wide chunks multiply
    // The tile, once: rows past r_end and columns past dim are zero.
    if (p.vec16) {
      const int chunks = int(kpad / 8);
      const int total = kBN * chunks;
      constexpr int kBatch = load_batch<kResidentBQ>();
      for (int base = 0; base < total; base += kBatch * kThreads) {
        uint4 v[kBatch];
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {  // all loads first (see load_batch)
          const int idx = base + j * kThreads + int(threadIdx.x);
          const int r = idx / chunks, c = (idx % chunks) * 8;
          const int64_t row = row0 + r;
          v[j] = make_uint4(0, 0, 0, 0);
          if (idx < total && row < p.r_end && c < p.dim) v[j] = __ldg(reinterpret_cast<const uint4*>(X + row * p.dim + c));
        }
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const int idx = base + j * kThreads + int(threadIdx.x);
          if (idx < total) *reinterpret_cast<uint4*>(xres + (idx / chunks) * ldx + (idx % chunks) * 8) = v[j];
        }
      }
    } else {
      for (int64_t idx = threadIdx.x; idx < kBN * kpad; idx += kThreads) {
        const int64_t r = idx / kpad, c = idx % kpad;
        const int64_t row = row0 + r;
        xres[r * ldx + c] = (row < p.r_end && c < p.dim) ? X[row * p.dim + c] : zero_val<T>();
      }
    }
    // (tile_scores_mma's first __syncthreads publishes the tile before any warp reads it.)
    for (int64_t q0 = 0; q0 < p.nq; q0 += BQ) {
      if (!DENSE) {
        for (int i = threadIdx.x; i < BQ; i += kThreads) tau_s[i] = q0 + i < p.nq ? p.tau[q0 + i] : kNegInf;
      }
      tile_scores_mma<T, BQ, true>(p, q0, row0, work, xres, ldx);
      emit_scores<BQ, DENSE>(p, q0, row0, reinterpret_cast<const float*>(work), tau_s, Smem::kLdS);
      __syncthreads();  // the next block overwrites the score area and tau_s
    }
  }
}

// ---- select: merge candidates into the running top-k ----

// select's dynamic shared memory at k = kMaxK (next_pow2 = 4096): ids + scores, 12 B per slot,
// plus about 1.1 KB static; the H200's per-block opt-in maximum is 232,448 B.
static_assert((CudaFlatIndex::kMaxK & (CudaFlatIndex::kMaxK - 1)) == 0, "select sizes its sort by kMaxK = 2^n");
static_assert(CudaFlatIndex::kMaxK * 12 + 2048 <= 232448, "select: k = kMaxK must fit one block's shared memory");

struct SelectParams {
  float* out_s;        // (nq, k): running results, sorted; updated in place
  int64_t* out_i;
  const float* cand_s;
  const uint32_t* cand_r;
  int* counts;         // filtered rounds; select sets counts[q] = 0 for the next round
  const int64_t* ids;  // shard ids; candidate row c maps to ids[r0 + c]
  float* tau;
  int64_t nq, k, cap, r0, dense_len;  // dense_len > 0: dense round of that many rows
  int pow2;            // smallest power of two >= k
};

__device__ __forceinline__ uint32_t score_key(float s) {
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // order-preserving, ascending
}

__device__ __forceinline__ bool before(float s1, int64_t i1, float s2, int64_t i2) {
  return s1 > s2 || (s1 == s2 && i1 < i2);
}

// hist[bin] += 1 for every thread with bin >= 0, one shared-memory atomic per distinct bin per warp:
// scores of one query share their top key bits, so plain atomics would serialise on a few bins.
// (cooperative groups: the coalesced group is exactly the threads that arrived together.)
__device__ __forceinline__ void count_bin(unsigned int* hist, int bin) {
  namespace cg = cooperative_groups;
  cg::coalesced_group active = cg::coalesced_threads();
  cg::coalesced_group peers = cg::labeled_partition(active, bin);
  if (bin >= 0 && peers.thread_rank() == 0) atomicAdd(&hist[bin], peers.size());
}

// Warp 0 of the select CTA: walking the 256 bins from the top (bin 255 = the largest keys), the
// bin where the count reaches `need`; writes that bin, how many of `need` remain inside it, its
// count and the total. Lane l owns bins 255 - 8l .. 248 - 8l, so a warp prefix sum replaces a
// 256-step serial loop on one thread (which was most of a select's latency, 4 passes per call).
// When the total is below need (only possible in the first pass, where the caller then takes all),
// it answers bin 0 and need - total, as the serial loop did.
__device__ __forceinline__ void find_bin(const unsigned int* hist, unsigned int need, unsigned int* s_sel,
                                         unsigned int* s_need, unsigned int* s_eq, unsigned int* s_total) {
  const unsigned int lane = threadIdx.x & 31u;
  unsigned int c[8], sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[255 - 8 * lane - j];
    sum += c[j];
  }
  unsigned int incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned int v = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= unsigned(off)) incl += v;
  }
  const unsigned int total = __shfl_sync(0xffffffffu, incl, 31);
  const unsigned int hit = __ballot_sync(0xffffffffu, incl >= need);
  if (hit == 0) {
    if (lane == 0) { *s_sel = 0; *s_need = need - total; *s_eq = hist[0]; *s_total = total; }
    return;
  }
  if (lane == unsigned(__ffs(hit) - 1)) {
    unsigned int cum = incl - sum, bin = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (cum + c[j] >= need) { bin = 255 - 8 * lane - j; break; }
      cum += c[j];
    }
    *s_sel = bin;
    *s_need = need - cum;
    *s_eq = hist[bin];
    *s_total = total;
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectParams p) {
  extern __shared__ __align__(16) unsigned char dyn[];
  int64_t* best_i = reinterpret_cast<int64_t*>(dyn);        // [pow2]
  float* best_s = reinterpret_cast<float*>(best_i + p.pow2);  // [pow2]
  __shared__ unsigned int hist[256];
  __shared__ unsigned int s_sel, s_need, s_eq, s_total, s_slot;
  const int64_t q = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t k = p.k;
  const int64_t nc = p.dense_len > 0 ? p.dense_len : min(int64_t(p.counts[q]), p.cap);
  const int64_t n = k + nc;
  const float* prev_s = p.out_s + q * k;
  const int64_t* prev_i = p.out_i + q * k;
  const float* cs = p.cand_s + q * p.cap;
  const uint32_t* cr = p.cand_r + q * p.cap;

  // The dense round starts the query afresh: the output arrays hold nothing yet (they are not
  // initialised, which saves a launch), so its first k elements count as empty.
  const bool fresh = p.dense_len > 0;
  auto score_of = [&](int64_t e) -> float {
    if (e < k) return (!fresh && prev_i[e] >= 0) ? prev_s[e] : kNegInf;
    return cs[e - k];
  };
  auto id_of = [&](int64_t e) -> int64_t {
    if (e < k) return prev_i[e];
    const int64_t c = e - k;
    return p.ids[p.r0 + (p.dense_len > 0 ? c : int64_t(cr[c]))];
  };

  // 1) radix select on the score key: after 4 passes `prefix` is the key of the k-th best and
  //    `need` how many of the elements equal to it belong to the top-k.
  uint32_t prefix = 0, mask = 0;
  unsigned int need = unsigned(k);
  bool take_all = false;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kSelectThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t e = tid; e < n; e += kSelectThreads) {
      const float s = score_of(e);
      int bin = -1;  // empty slot, disallowed row, NaN, or outside the prefix
      if (s > kNegInf) {
        const uint32_t key = score_key(s);
        if ((key & mask) == prefix) bin = int((key >> shift) & 255u);
      }
      count_bin(hist, bin);
    }
    __syncthreads();
    if (tid < 32) find_bin(hist, need, &s_sel, &s_need, &s_eq, &s_total);
    __syncthreads();
    if (shift == 24 && s_total <= unsigned(k)) { take_all = true; break; }
    prefix |= s_sel << shift;
    mask |= 255u << shift;
    need = s_need;
    __syncthreads();
  }

  // 2) only when equal scores straddle the k-th place: the `need` smallest ids among them.
  bool tie_by_id = false;
  unsigned long long id_prefix = 0;
  if (!take_all && s_eq > need) {
    tie_by_id = true;
    unsigned long long id_mask = 0;
    unsigned int id_need = need;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kSelectThreads) hist[b] = 0;
      __syncthreads();
      for (int64_t e = tid; e < n; e += kSelectThreads) {
        const float s = score_of(e);
        int bin = -1;
        if (s > kNegInf && score_key(s) == prefix) {
          const unsigned long long key = ~static_cast<unsigned long long>(id_of(e));  // larger = smaller id
          if ((key & id_mask) == id_prefix) bin = int((key >> shift) & 255u);
        }
        count_bin(hist, bin);
      }
      __syncthreads();
      // (s_eq and s_total are not used past this point; find_bin overwrites them harmlessly.)
      if (tid < 32) find_bin(hist, id_need, &s_sel, &s_need, &s_eq, &s_total);
      __syncthreads();
      id_prefix |= static_cast<unsigned long long>(s_sel) << shift;
      id_mask |= 255ull << shift;
      id_need = s_need;
      __syncthreads();
    }
  }

  // 3) gather the winners, pad, sort (best first), write back.
  if (tid == 0) s_slot = 0;
  __syncthreads();
  for (int64_t e = tid; e < n; e += kSelectThreads) {
    const float s = score_of(e);
    if (!(s > kNegInf)) continue;
    bool take = take_all;
    if (!take) {
      const uint32_t key = score_key(s);
      if (key > prefix) take = true;
      else if (key == prefix) take = !tie_by_id || ~static_cast<unsigned long long>(id_of(e)) >= id_prefix;
    }
    if (take) {
      const unsigned int slot = atomicAdd(&s_slot, 1u);
      if (slot < unsigned(p.pow2)) { best_s[slot] = s; best_i[slot] = id_of(e); }
    }
  }
  __syncthreads();
  const int taken = int(min(s_slot, unsigned(k)));
  for (int j = taken + tid; j < p.pow2; j += kSelectThreads) {
    best_s[j] = kNegInf;
    best_i[j] = INT64_MAX;
  }
  __syncthreads();
  for (int size = 2; size <= p.pow2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < p.pow2 / 2; t += kSelectThreads) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool best_first = (lo & size) == 0;
        const bool hi_better = before(best_s[hi], best_i[hi], best_s[lo], best_i[lo]);
        if (hi_better == best_first) {
          const float ts = best_s[lo]; best_s[lo] = best_s[hi]; best_s[hi] = ts;
          const int64_t ti = best_i[lo]; best_i[lo] = best_i[hi]; best_i[hi] = ti;
        }
      }
      __syncthreads();
    }
  }
  float* os = p.out_s + q * k;
  int64_t* oi = p.out_i + q * k;
  for (int64_t j = tid; j < k; j += kSelectThreads) {
    const bool valid = j < taken;
    os[j] = valid ? best_s[j] : kNegInf;
    oi[j] = valid ? best_i[j] : -1;
  }
  if (tid == 0) {
    p.tau[q] = taken == int(k) ? best_s[k - 1] : kNegInf;
    p.counts[q] = 0;  // every thread read it at the top (nc); this saves a memset per round
  }
}

// ---- small kernels ----

__global__ void init_kernel(float* out_s, int64_t* out_i, int64_t n, float* tau, int64_t nq) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out_s[i] = kNegInf;
    out_i[i] = -1;
  }
  if (tau != nullptr)
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nq; i += int64_t(gridDim.x) * blockDim.x)
      tau[i] = kNegInf;
}

// flags[1] = ~(index of the first non-finite query element), 0 when all are finite: stored
// complemented so that the memset to zero that clears the overflow flag clears this one too.
template <typename T>
__global__ void finite_kernel(const T* x, int64_t n, unsigned long long* bad_flag) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!isfinite(to_f<T>(x[i]))) atomicMax(bad_flag, ~static_cast<unsigned long long>(i));
  }
}

int grid_for(int64_t n, int threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 4096)));
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CLV_CUDA(cudaGetDevice(&prev_));
    if (prev_ != device) CLV_CUDA(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; o.bytes = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept { std::swap(ptr, o.ptr); std::swap(bytes, o.bytes); return *this; }
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
  void ensure(size_t want) {
    if (want <= bytes) return;
    if (ptr) { cudaFree(ptr); ptr = nullptr; bytes = 0; }
    CLV_CUDA(cudaMalloc(&ptr, want));
    bytes = want;
  }
  template <typename U> U* as() const { return static_cast<U*>(ptr); }
};

}  // namespace

struct CudaFlatIndex::Impl {
  FlatIndex host;
  Options opt;
  std::mutex mu;

  struct Shard {
    int64_t row0 = 0, rows = 0;
    bool resident = false;
    DeviceBuffer vec, ids;
  };
  std::vector<Shard> shards;
  int64_t uploaded_rows = 0;  // device copy valid for rows [0, uploaded_rows) of the host
  int64_t dirty_from = 0;     // rows from here on changed since the last upload
  DeviceBuffer stage_vec, stage_ids;

  DeviceBuffer cand_s, cand_r, counts, tau, flags;
  unsigned long long* host_flags = nullptr;  // pinned: [overflow, ~first non-finite query element]
  bool attrs_set = false;  // dynamic shared-memory opt-ins of select and the resident scans
  int sm_count = 0, cc_major = 0;
  // CLINVLA_CUDA_SCAN=grid (read when the index is made) turns the resident scan shape off: an
  // A/B switch for benchmarks/bench_topk.py and a way around it should it ever misbehave.
  bool allow_resident = true;

  Impl(FlatIndex&& h, const Options& o) : host(std::move(h)), opt(o) {
    const char* shape = std::getenv("CLINVLA_CUDA_SCAN");
    const std::string want = shape ? shape : "";
    if (want == "grid") allow_resident = false;
    else if (!want.empty() && want != "auto")
      fail(ErrorCode::Invalid, "CLINVLA_CUDA_SCAN must be 'auto' or 'grid', got '", want, "': unset it or use one of those");
  }
  ~Impl() { if (host_flags) cudaFreeHost(host_flags); }

  int64_t row_bytes() const { return host.dim() * int64_t(dtype_size(host.dtype())); }
  int64_t shard_rows() const {
    // Candidate rows are stored as uint32 offsets within a shard: keep shards below 2^31 rows.
    const int64_t want = opt.shard_rows > 0 ? opt.shard_rows : std::max<int64_t>(1024, (int64_t(1) << 30) / row_bytes());
    return std::min<int64_t>(want, int64_t(1) << 31);
  }

  void upload(cudaStream_t stream);
  void search(int64_t nq, const void* queries, int64_t k, float* scores, int64_t* ids, const AllowList& allow,
              cudaStream_t stream);
  // safe = false: optimistic round lengths (overflow possible, flagged); true: rounds <= cap.
  void search_rounds(int64_t nq, const void* queries, int64_t k, float* scores, int64_t* ids,
                     const AllowList& allow, cudaStream_t stream, bool safe);
  // The resident scan shape pays off with more than one query block and enough tiles to fill
  // every SM a few times over (one CTA per tile); the dense round (L0 rows) usually has too few.
  bool use_resident(DType dt, int64_t nq, int64_t tiles) const {
    if (!allow_resident || dt == DType::Float32 || (dt == DType::BFloat16 && cc_major < 8)) return false;
    if (nq <= kResidentBQ || tiles < 4 * int64_t(sm_count)) return false;
    const int64_t smem = dt == DType::Float16 ? resident_smem<__half>(host.dim()) : resident_smem<__nv_bfloat16>(host.dim());
    return smem <= kResidentMaxSmem;
  }
};

void CudaFlatIndex::Impl::upload(cudaStream_t stream) {
  const int64_t N = host.size();
  const int64_t per = shard_rows();
  const int64_t nshards = (N + per - 1) / per;
  const int64_t rb = row_bytes();
  const uint8_t* hv = static_cast<const uint8_t*>(host.vectors());
  const int64_t* hi = host.ids();
  if (uploaded_rows == N && dirty_from >= N && int64_t(shards.size()) == nshards) return;

  int64_t budget = opt.max_device_bytes;
  if (budget < 0) {
    size_t free_b = 0, total_b = 0;
    CLV_CUDA(cudaMemGetInfo(&free_b, &total_b));
    size_t held = 0;
    for (auto& s : shards) held += s.vec.bytes + s.ids.bytes;
    budget = int64_t(double(free_b + held) * 0.8);
  }
  shards.resize(size_t(nshards));
  int64_t used = 0;
  for (int64_t s = 0; s < nshards; ++s) {
    Shard& sh = shards[size_t(s)];
    const int64_t row0 = s * per, rows = std::min(per, N - row0);
    const int64_t bytes = rows * rb + rows * 8;
    const bool fits = used + bytes <= budget;
    const bool same = sh.resident && sh.row0 == row0 && sh.rows == rows && row0 + rows <= dirty_from &&
                      row0 + rows <= uploaded_rows;
    sh.row0 = row0;
    sh.rows = rows;
    if (!fits) {  // streamed at search time
      sh.resident = false;
      sh.vec = DeviceBuffer();
      sh.ids = DeviceBuffer();
      continue;
    }
    used += bytes;
    if (same) continue;
    // Capacity for a whole shard, so appends to the last shard do not reallocate each time.
    const int64_t cap_rows = nshards > 1 ? per : std::min(per, std::max<int64_t>(rows + rows / 2, 1024));
    sh.vec.ensure(size_t(cap_rows * rb));
    sh.ids.ensure(size_t(cap_rows * 8));
    CLV_CUDA(cudaMemcpyAsync(sh.vec.ptr, hv + row0 * rb, size_t(rows * rb), cudaMemcpyHostToDevice, stream));
    CLV_CUDA(cudaMemcpyAsync(sh.ids.ptr, hi + row0, size_t(rows * 8), cudaMemcpyHostToDevice, stream));
    sh.resident = true;
  }
  uploaded_rows = N;
  dirty_from = N;
}

namespace {

template <typename T, int BQ, bool DENSE>
void launch_scan(const ScanParams& p, int64_t tiles, cudaStream_t stream) {
  // A grid holds at most 2^31 - 1 CTAs: very long ranges go in several launches (tile0 moves on,
  // r0 stays, so candidate rows remain relative to the round's first row).
  const int64_t per_launch = std::max<int64_t>(1, int64_t(INT32_MAX) / p.n_qblocks);
  for (int64_t t0 = 0; t0 < tiles; t0 += per_launch) {
    ScanParams pp = p;
    pp.tile0 = t0;
    const int64_t nt = std::min(per_launch, tiles - t0);
    scan_kernel<T, BQ, DENSE><<<unsigned(nt * p.n_qblocks), kThreads, 0, stream>>>(pp);
  }
  CLV_CUDA(cudaGetLastError());
}

template <typename T, bool DENSE>
void launch_resident(const ScanParams& p, int64_t tiles, cudaStream_t stream) {
  const size_t smem = size_t(resident_smem<T>(p.dim));
  const int64_t per_launch = int64_t(INT32_MAX);
  for (int64_t t0 = 0; t0 < tiles; t0 += per_launch) {
    ScanParams pp = p;
    pp.tile0 = t0;
    pp.n_qblocks = 1;
    const int64_t nt = std::min(per_launch, tiles - t0);
    scan_resident_kernel<T, DENSE><<<unsigned(nt), kThreads, smem, stream>>>(pp);
  }
  CLV_CUDA(cudaGetLastError());
}

template <typename T, bool DENSE>
void scan_any(const ScanParams& p, int64_t tiles, bool resident, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    if (resident) {
      launch_resident<T, DENSE>(p, tiles, stream);
      return;
    }
  }
  if (p.nq <= 16) {
    ScanParams pp = p;
    pp.n_qblocks = (p.nq + 15) / 16;
    launch_scan<T, 16, DENSE>(pp, tiles, stream);
  } else {
    ScanParams pp = p;
    pp.n_qblocks = (p.nq + 63) / 64;
    launch_scan<T, 64, DENSE>(pp, tiles, stream);
  }
}

template <bool DENSE>
void scan_dtype(DType dt, const ScanParams& p, int64_t tiles, bool resident, cudaStream_t stream) {
  switch (dt) {
    case DType::Float32: scan_any<float, DENSE>(p, tiles, false, stream); break;
    case DType::Float16: scan_any<__half, DENSE>(p, tiles, resident, stream); break;
    case DType::BFloat16: scan_any<__nv_bfloat16, DENSE>(p, tiles, resident, stream); break;
  }
}

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace

void CudaFlatIndex::Impl::search(int64_t nq, const void* queries, int64_t k, float* out_s, int64_t* out_i,
                                 const AllowList& allow, cudaStream_t stream) {
  const int64_t dim = host.dim();
  const DType dt = host.dtype();
  const int64_t N = host.size();
  if (!host_flags) CLV_CUDA(cudaMallocHost(reinterpret_cast<void**>(&host_flags), 2 * sizeof(unsigned long long)));
  flags.ensure(2 * sizeof(unsigned long long));
  unsigned long long* dflags = flags.as<unsigned long long>();
  if (!attrs_set) {
    CLV_CUDA(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, opt.device));
    CLV_CUDA(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, opt.device));
    CLV_CUDA(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  next_pow2(kMaxK) * 12));
    // Opted in once for the largest resident tile use_resident() allows (above 48 KB needs it).
    CLV_CUDA(cudaFuncSetAttribute(scan_resident_kernel<__half, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kResidentMaxSmem));
    CLV_CUDA(cudaFuncSetAttribute(scan_resident_kernel<__half, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kResidentMaxSmem));
    CLV_CUDA(cudaFuncSetAttribute(scan_resident_kernel<__nv_bfloat16, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kResidentMaxSmem));
    CLV_CUDA(cudaFuncSetAttribute(scan_resident_kernel<__nv_bfloat16, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kResidentMaxSmem));
    attrs_set = true;
  }

  // One memset clears both flags: [0] overflow (sticky), [1] ~first non-finite query element.
  CLV_CUDA(cudaMemsetAsync(dflags, 0, 2 * sizeof(unsigned long long), stream));
  const int64_t nel = nq * dim;
  switch (dt) {
    case DType::Float32:
      finite_kernel<float><<<grid_for(nel, 256), 256, 0, stream>>>(static_cast<const float*>(queries), nel, dflags + 1);
      break;
    case DType::Float16:
      finite_kernel<__half><<<grid_for(nel, 256), 256, 0, stream>>>(static_cast<const __half*>(queries), nel, dflags + 1);
      break;
    case DType::BFloat16:
      finite_kernel<__nv_bfloat16><<<grid_for(nel, 256), 256, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(queries), nel, dflags + 1);
      break;
  }
  CLV_CUDA(cudaGetLastError());

  const bool empty = k == 0 || N == 0;
  if (empty) {
    if (k > 0) {
      init_kernel<<<grid_for(nq * k, 256), 256, 0, stream>>>(out_s, out_i, nq * k, nullptr, 0);
      CLV_CUDA(cudaGetLastError());
    }
  } else {
    upload(stream);
    search_rounds(nq, queries, k, out_s, out_i, allow, stream, /*safe=*/false);
  }
  // The one wait of a search: the caller's contract is that a non-finite query raises here.
  CLV_CUDA(cudaMemcpyAsync(host_flags, dflags, 2 * sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
  CLV_CUDA(cudaStreamSynchronize(stream));
  if (host_flags[1] != 0) {
    const unsigned long long bad = ~host_flags[1];
    fail(ErrorCode::Invalid, "search: queries must be finite, but query ", bad / uint64_t(dim),
         " has a NaN or infinite value at dimension ", bad % uint64_t(dim));
  }
  if (!empty && host_flags[0] != 0) {
    // Some round had more candidates than slots (rows in an adversarial order): results may miss
    // vectors. Redo with rounds that cannot overflow; rare, so the common path never waits.
    search_rounds(nq, queries, k, out_s, out_i, allow, stream, /*safe=*/true);
    CLV_CUDA(cudaStreamSynchronize(stream));
  }
}

void CudaFlatIndex::Impl::search_rounds(int64_t nq, const void* queries, int64_t k, float* out_s, int64_t* out_i,
                                        const AllowList& allow, cudaStream_t stream, bool safe) {
  const int64_t dim = host.dim();
  const DType dt = host.dtype();
  const int64_t N = host.size();
  unsigned long long* dflags = flags.as<unsigned long long>();
  const int select_smem = next_pow2(k) * 12;

  // Workspace: per query, cap candidate slots (score + row), within opt.workspace_bytes.
  const int64_t ws = std::max<int64_t>(opt.workspace_bytes, int64_t(64) << 20);
  const int64_t min_cap = std::max<int64_t>(4 * k, 16384);
  const int64_t qchunk = std::max<int64_t>(1, std::min<int64_t>(nq, ws / (8 * min_cap)));
  const int64_t cap = std::max<int64_t>(min_cap, std::min<int64_t>(ws / (8 * qchunk), (N + 4095) / 4096 * 4096));
  cand_s.ensure(size_t(qchunk * cap * 4));
  cand_r.ensure(size_t(qchunk * cap * 4));
  counts.ensure(size_t(qchunk * 4));
  tau.ensure(size_t(qchunk * 4));
  const int64_t L0 = std::min<int64_t>(cap, std::max<int64_t>(8192, 8 * k));

  const int64_t rb = row_bytes();
  const uint8_t* hv = static_cast<const uint8_t*>(host.vectors());
  const int64_t* hid = host.ids();

  for (int64_t qa = 0; qa < nq; qa += qchunk) {
    const int64_t nqc = std::min(qchunk, nq - qa);
    const int64_t kq = k;
    float* os = out_s + qa * k;
    int64_t* oi = out_i + qa * k;
    // No initialisation: the dense round (every chunk starts with one) neither reads counts nor the
    // outputs' old contents, and its select writes all k outputs, sets tau and zeroes counts.

    ScanParams sp{};
    sp.queries = static_cast<const uint8_t*>(queries) + qa * dim * int64_t(dtype_size(dt));
    sp.nq = nqc;
    sp.dim = dim;
    sp.cand_s = cand_s.as<float>();
    sp.cand_r = cand_r.as<uint32_t>();
    sp.counts = counts.as<int>();
    sp.tau = tau.as<float>();
    sp.overflow = reinterpret_cast<int*>(dflags);
    sp.cap = cap;
    sp.allow = DeviceAllow{allow.data ? allow.data + qa * allow.stride_bytes : nullptr, allow.n_ids,
                           allow.stride_bytes, allow.packed ? 1 : 0};

    SelectParams sel{};
    sel.out_s = os;
    sel.out_i = oi;
    sel.cand_s = cand_s.as<float>();
    sel.cand_r = cand_r.as<uint32_t>();
    sel.counts = counts.as<int>();
    sel.tau = tau.as<float>();
    sel.nq = nqc;
    sel.k = kq;
    sel.cap = cap;
    sel.pow2 = next_pow2(k);

    int64_t processed = 0;
    for (Shard& sh : shards) {
      const void* vec = sh.vec.ptr;
      const int64_t* ids = sh.ids.as<int64_t>();
      if (!sh.resident) {  // larger than the device budget: copy this shard in now
        stage_vec.ensure(size_t(shard_rows() * rb));
        stage_ids.ensure(size_t(shard_rows() * 8));
        CLV_CUDA(cudaMemcpyAsync(stage_vec.ptr, hv + sh.row0 * rb, size_t(sh.rows * rb), cudaMemcpyHostToDevice, stream));
        CLV_CUDA(cudaMemcpyAsync(stage_ids.ptr, hid + sh.row0, size_t(sh.rows * 8), cudaMemcpyHostToDevice, stream));
        vec = stage_vec.ptr;
        ids = stage_ids.as<int64_t>();
      }
      sp.vectors = vec;
      sp.ids = ids;
      sel.ids = ids;
      const uintptr_t align_bits = reinterpret_cast<uintptr_t>(sp.queries) | reinterpret_cast<uintptr_t>(vec);
      sp.vec16 = dt != DType::Float32 && dim % 8 == 0 && (align_bits & 15u) == 0;

      for (int64_t pos = 0; pos < sh.rows;) {
        const bool dense = processed == 0;
        // Safe rounds hold at most cap rows, so each query's candidates always fit.
        const int64_t grow = safe ? cap : std::max(L0, int64_t(double(processed) * double(cap) / double(4 * k)));
        const int64_t len = dense ? std::min(L0, sh.rows) : std::min(sh.rows - pos, grow);
        const int64_t r0 = pos;
        pos += len;
        sp.r0 = r0;
        sp.r_end = r0 + len;
        const int64_t tiles = (len + kBN - 1) / kBN;
        const bool resident = use_resident(dt, nqc, tiles);
        if (dense) {
          scan_dtype<true>(dt, sp, tiles, resident, stream);
        } else {
          scan_dtype<false>(dt, sp, tiles, resident, stream);
        }
        sel.r0 = r0;
        sel.dense_len = dense ? len : 0;
        select_kernel<<<unsigned(nqc), kSelectThreads, size_t(select_smem), stream>>>(sel);
        CLV_CUDA(cudaGetLastError());
        processed += len;
      }
    }
  }
}

// ---- public class ----

CudaFlatIndex::CudaFlatIndex(int64_t dim, DType dtype, const Options& options)
    : CudaFlatIndex(FlatIndex(dim, dtype), options) {}

CudaFlatIndex::CudaFlatIndex(FlatIndex&& host, const Options& options) {
  int count = device_count();
  if (count == 0) fail(ErrorCode::Unsupported, "no CUDA device is visible (cudaGetDeviceCount found none)");
  if (options.device < 0 || options.device >= count)
    fail(ErrorCode::Invalid, "CUDA device ", options.device, " does not exist (", count, " visible)");
  impl_ = std::make_unique<Impl>(std::move(host), options);
}

CudaFlatIndex::~CudaFlatIndex() {
  if (impl_) {
    int prev = 0;
    if (cudaGetDevice(&prev) == cudaSuccess) {
      cudaSetDevice(impl_->opt.device);
      impl_.reset();
      cudaSetDevice(prev);
    }
  }
}

bool CudaFlatIndex::built() { return true; }

int CudaFlatIndex::device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int CudaFlatIndex::device() const { return impl_->opt.device; }
int64_t CudaFlatIndex::dim() const { return impl_->host.dim(); }
DType CudaFlatIndex::dtype() const { return impl_->host.dtype(); }
int64_t CudaFlatIndex::size() const { return impl_->host.size(); }
const FlatIndex& CudaFlatIndex::host() const { return impl_->host; }

void CudaFlatIndex::add(int64_t n, const void* vectors, DType src_dtype, const int64_t* ids, int64_t* assigned_ids,
                        bool vectors_on_device) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const int64_t before = impl_->host.size();
  if (vectors_on_device && n > 0) {
    if (!vectors) fail(ErrorCode::Invalid, "add: vectors is a null pointer for ", n, " vectors");
    DeviceGuard guard(impl_->opt.device);
    std::vector<uint8_t> staged(size_t(n * impl_->host.dim()) * dtype_size(src_dtype));
    CLV_CUDA(cudaMemcpy(staged.data(), vectors, staged.size(), cudaMemcpyDeviceToHost));
    impl_->host.add(n, staged.data(), src_dtype, ids, assigned_ids);
  } else {
    impl_->host.add(n, vectors, src_dtype, ids, assigned_ids);
  }
  impl_->dirty_from = std::min(impl_->dirty_from, before);
}

int64_t CudaFlatIndex::remove(int64_t n, const int64_t* host_ids) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  // Rows move from the first removed one on; re-upload from there (conservatively from 0 when the
  // first removed row is unknown).
  const int64_t removed = impl_->host.remove(n, host_ids);
  if (removed) impl_->dirty_from = 0;
  return removed;
}

void CudaFlatIndex::search(int64_t nq, const void* queries, int64_t k, float* scores, int64_t* ids,
                           const AllowList& allow, void* stream) {
  if (nq < 0) fail(ErrorCode::Invalid, "search: the number of queries must be >= 0, got ", nq);
  if (k < 0 || k > kMaxK) fail(ErrorCode::Invalid, "search: k must be between 0 and ", kMaxK, " on CUDA, got ", k);
  if (allow.data && (allow.n_ids < 0 || allow.stride_bytes < 0))
    fail(ErrorCode::Invalid, "search: allow-list n_ids and stride_bytes must be >= 0");
  if (nq == 0) return;
  if (!queries) fail(ErrorCode::Invalid, "search: queries is a null pointer for ", nq, " queries");
  if (k > 0 && (!scores || !ids)) fail(ErrorCode::Invalid, "search: scores / ids output is a null pointer");
  std::lock_guard<std::mutex> lock(impl_->mu);
  DeviceGuard guard(impl_->opt.device);
  impl_->search(nq, queries, k, scores, ids, allow, static_cast<cudaStream_t>(stream));
}

void CudaFlatIndex::save(const std::string& path) const { impl_->host.save(path); }

}  // namespace clinvla
