// CudaFlatIndex: exact top-k on one GPU, a fused matrix product + threshold filter, then merges.
//
// Maths. For queries Q (nq, D) and stored vectors X (N, D): S = Q X^T, and for each query the k
// largest S[q, :] with ties broken by the smaller id. S is never written whole:
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
// candidates are expected (random order); a round whose candidates could overflow cap is checked
// (one host sync) and, if it did overflow, redone in halves (a range of <= cap rows never can).
//
// The scan: one CTA of 4 warps per (64 or 16 queries) x (128 rows) tile, D walked in chunks of 64
// through shared memory; float16 / bfloat16 use tensor cores (WMMA m16n16k16, float accumulate),
// float32 uses FFMA. Offsets are int64 wherever rows * dim can pass 2^31. Vectors live on the device
// in shards; shards beyond the memory budget are copied in through one staging buffer when
// searched. All work is on the caller's stream; buffers are allocated on first need and reused.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
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

template <typename T, int BQ>
__device__ void tile_scores_mma(const ScanParams& p, int64_t q0, int64_t row0, unsigned char* smem) {
  using namespace nvcuda;
  using Smem = ScanSmem<T, BQ>;
  constexpr int LdT = Smem::kLdT;
  T* qs = reinterpret_cast<T*>(smem);
  T* xs = qs + BQ * LdT;
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
      for (int idx = threadIdx.x; idx < (BQ + kBN) * kChunks; idx += kThreads) {
        const int r = idx / kChunks, c = (idx % kChunks) * 8;
        const int64_t k = k0 + c;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < BQ) {
          const int64_t q = q0 + r;
          if (q < p.nq && k < p.dim) v = *reinterpret_cast<const uint4*>(Q + q * p.dim + k);
          *reinterpret_cast<uint4*>(qs + r * LdT + c) = v;
        } else {
          const int64_t row = row0 + (r - BQ);
          if (row < p.r_end && k < p.dim) v = __ldg(reinterpret_cast<const uint4*>(X + row * p.dim + k));
          *reinterpret_cast<uint4*>(xs + (r - BQ) * LdT + c) = v;
        }
      }
    } else {
      for (int idx = threadIdx.x; idx < (BQ + kBN) * kBK; idx += kThreads) {
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
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], xs + (warp * 32 + j * 16) * LdT + kk, LdT);
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
    tile_scores_mma<T, BQ>(p, q0, row0, smem);
#endif
  } else {
    tile_scores_mma<T, BQ>(p, q0, row0, smem);
  }

  const float* S = reinterpret_cast<const float*>(smem);
  for (int idx = threadIdx.x; idx < BQ * kBN; idx += kThreads) {
    const int i = idx / kBN, j = idx % kBN;
    const int64_t q = q0 + i, row = row0 + j;
    if (q >= p.nq || row >= p.r_end) continue;
    const float s = S[i * Smem::kLdS + j];
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
        *p.overflow = 1;
      }
    }
  }
}

// ---- select: merge candidates into the running top-k ----

struct SelectParams {
  float* out_s;        // (nq, k): running results, sorted; updated in place
  int64_t* out_i;
  const float* cand_s;
  const uint32_t* cand_r;
  const int* counts;   // filtered rounds
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

  auto score_of = [&](int64_t e) -> float {
    if (e < k) return prev_i[e] >= 0 ? prev_s[e] : kNegInf;
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
    if (tid == 0) {
      unsigned int cum = 0, sel = 0, total = 0;
      for (int b = 0; b < 256; ++b) total += hist[b];
      for (int b = 255; b >= 0; --b) {
        if (cum + hist[b] >= need) { sel = unsigned(b); break; }
        cum += hist[b];
      }
      s_total = total;
      s_sel = sel;
      s_need = need - cum;
      s_eq = hist[sel];
    }
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
      if (tid == 0) {
        unsigned int cum = 0, sel = 0;
        for (int b = 255; b >= 0; --b) {
          if (cum + hist[b] >= id_need) { sel = unsigned(b); break; }
          cum += hist[b];
        }
        s_sel = sel;
        s_need = id_need - cum;
      }
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
  if (tid == 0) p.tau[q] = taken == int(k) ? best_s[k - 1] : kNegInf;
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

template <typename T>
__global__ void finite_kernel(const T* x, int64_t n, unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (!isfinite(to_f<T>(x[i]))) atomicMin(first_bad, static_cast<unsigned long long>(i));
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
  unsigned long long* host_flags = nullptr;  // pinned: [overflow, first non-finite query value]
  bool select_attr_set = false;

  Impl(FlatIndex&& h, const Options& o) : host(std::move(h)), opt(o) {}
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
  void search_rounds(int64_t nq, const void* queries, int64_t k, float* scores, int64_t* ids,
                     const AllowList& allow, cudaStream_t stream);
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
void scan_any(const ScanParams& p, int64_t tiles, cudaStream_t stream) {
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
void scan_dtype(DType dt, const ScanParams& p, int64_t tiles, cudaStream_t stream) {
  switch (dt) {
    case DType::Float32: scan_any<float, DENSE>(p, tiles, stream); break;
    case DType::Float16: scan_any<__half, DENSE>(p, tiles, stream); break;
    case DType::BFloat16: scan_any<__nv_bfloat16, DENSE>(p, tiles, stream); break;
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
  if (!select_attr_set) {
    CLV_CUDA(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  next_pow2(kMaxK) * 12));
    select_attr_set = true;
  }

  // Non-finite queries: the first bad element's index (or all ones), read back at the end.
  CLV_CUDA(cudaMemsetAsync(dflags + 1, 0xff, sizeof(unsigned long long), stream));
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

  if (k == 0 || N == 0) {
    if (k > 0) {
      init_kernel<<<grid_for(nq * k, 256), 256, 0, stream>>>(out_s, out_i, nq * k, nullptr, 0);
      CLV_CUDA(cudaGetLastError());
    }
  } else {
    upload(stream);
    search_rounds(nq, queries, k, out_s, out_i, allow, stream);
  }
  CLV_CUDA(cudaMemcpyAsync(host_flags + 1, dflags + 1, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
  CLV_CUDA(cudaStreamSynchronize(stream));
  if (host_flags[1] != ~0ull) {
    const unsigned long long bad = host_flags[1];
    fail(ErrorCode::Invalid, "search: queries must be finite, but query ", bad / uint64_t(dim),
         " has a NaN or infinite value at dimension ", bad % uint64_t(dim));
  }
}

void CudaFlatIndex::Impl::search_rounds(int64_t nq, const void* queries, int64_t k, float* out_s, int64_t* out_i,
                                        const AllowList& allow, cudaStream_t stream) {
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
    init_kernel<<<grid_for(nqc * k, 256), 256, 0, stream>>>(os, oi, nqc * k, tau.as<float>(), nqc);
    CLV_CUDA(cudaGetLastError());

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

      // Ranges still to process in this shard (a stack: an overflowed range is split in halves).
      std::vector<std::pair<int64_t, int64_t>> todo;
      int64_t pos = 0;
      while (pos < sh.rows || !todo.empty()) {
        int64_t r0, len;
        if (!todo.empty()) {
          r0 = todo.back().first;
          len = todo.back().second;
          todo.pop_back();
        } else {
          len = processed == 0 ? std::min(L0, sh.rows)
                               : std::min(sh.rows - pos,
                                          std::max(L0, int64_t(double(processed) * double(cap) / double(4 * k))));
          r0 = pos;
          pos += len;
        }
        const bool dense = processed == 0;
        sp.r0 = r0;
        sp.r_end = r0 + len;
        const int64_t tiles = (len + kBN - 1) / kBN;
        if (dense) {
          scan_dtype<true>(dt, sp, tiles, stream);
        } else {
          CLV_CUDA(cudaMemsetAsync(sp.counts, 0, size_t(nqc) * sizeof(int), stream));
          CLV_CUDA(cudaMemsetAsync(dflags, 0, sizeof(unsigned long long), stream));
          scan_dtype<false>(dt, sp, tiles, stream);
          if (len > cap) {  // more rows than slots: the candidates might not have fit
            CLV_CUDA(cudaMemcpyAsync(host_flags, dflags, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
            CLV_CUDA(cudaStreamSynchronize(stream));
            if (host_flags[0] != 0) {
              const int64_t half = len / 2;
              todo.push_back({r0 + half, len - half});  // processed second
              todo.push_back({r0, half});
              continue;
            }
          }
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
