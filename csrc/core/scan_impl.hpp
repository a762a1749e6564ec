// CPU scan kernels: scores = queries . database^T fused with a per-query bounded heap.
//
// Included once per instruction set by scan_generic.cpp / scan_avx2.cpp / scan_avx512.cpp, which
// define CLINVLA_ISA_NS (the namespace), CLINVLA_ISA_NAME and the compiler's -m flags. The code is
// written with GCC/Clang vector extensions (vf = W floats), so one source becomes SSE2, AVX2 or
// AVX-512 code; intrinsics appear only for the half-float conversion and the compare-to-bitmask.
//
// Two kernels:
//  * panel kernel (most query counts): queries are packed as panels of PW = NV*W queries laid out
//    (dim, PW), so a register tile of MR database rows x PW queries is an outer-product
//    accumulation: per dimension d, MR broadcasts of x[row, d] times NV query vectors. The
//    database is read once per query chunk; MR rows at a time are converted (float16/bfloat16) or
//    copied (float32) to an L1-resident float32 buffer that the broadcasts read. The score tile never
//    leaves registers: it is compared with the per-query heap thresholds (one vector compare per
//    W scores) and only scores >= threshold go to the scalar heap update.
//  * dot kernel (1 to 4 queries): vectorised along the dimension, 4 rows at a time; this is
//    memory-bound, so it only has to keep up with the read of the database.
//
// Heap order: a result (s, id) is better than (s', id') when s > s' or s == s' and id < id'.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 conversion intrinsics start from an intentionally undefined register.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "half.hpp"
#include "scan.hpp"

#ifndef CLINVLA_ISA_NS
#error "define CLINVLA_ISA_NS before including scan_impl.hpp"
#endif

namespace clinvla {
namespace detail {
namespace CLINVLA_ISA_NS {
namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int MR2 = 12;  // rows per register tile when a panel is 2 vectors wide
constexpr int MR1 = 24;  // ... 1 vector wide
#elif defined(__AVX2__)
constexpr int W = 8;
constexpr int MR2 = 6;
constexpr int MR1 = 12;
#else
constexpr int W = 4;
constexpr int MR2 = 6;
constexpr int MR1 = 12;
#endif
constexpr int kDotMaxQueries = W >= 8 ? 4 : 2;
constexpr int kDotRows = 4;

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

inline vf loadf(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storef(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// A broadcast the compiler can fold into the load (vbroadcastss mem): `vf{} + x` cannot be, since
// 0 + (-0) is +0, and costs an add plus a shuffle-port broadcast per row and dimension.
inline vf splat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(x);
#elif defined(__SSE2__)
  return (vf)_mm_set1_ps(x);
#else
  vf v;
  for (int l = 0; l < W; ++l) v[l] = x;
  return v;
#endif
}

inline vf half_vec(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX2__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vh h; std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu);
  const vu sign = (u & 0x8000u) << 16;
  const vu em = u & 0x7fffu;
  const vu normal = (em << 13) + 0x38000000u;
  const vu infnan = (em << 13) | 0x7f800000u;
  const vf subf = __builtin_convertvector((vi)em, vf) * 5.9604644775390625e-08f;  // em * 2^-24
  const vu r = (em < 0x400u) ? (vu)subf : ((em >= 0x7c00u) ? infnan : normal);
  return (vf)(r | sign);
#endif
}

inline vf bf16_vec(const uint16_t* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

template <DType DT>
inline vf load_vec(const void* base, int64_t i) {
  if constexpr (DT == DType::Float32) return loadf(static_cast<const float*>(base) + i);
  else if constexpr (DT == DType::Float16) return half_vec(static_cast<const uint16_t*>(base) + i);
  else return bf16_vec(static_cast<const uint16_t*>(base) + i);
}

template <DType DT>
inline float load_scalar(const void* base, int64_t i) {
  if constexpr (DT == DType::Float32) return static_cast<const float*>(base)[i];
  else if constexpr (DT == DType::Float16) return half_to_float(static_cast<const uint16_t*>(base)[i]);
  else return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
}

// Bit l set when s[l] >= t[l] (false for NaN).
inline uint32_t mask_ge(vf s, vf t) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)s, (__m512)t, _CMP_GE_OQ);
#elif defined(__AVX__)
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps((__m256)s, (__m256)t, _CMP_GE_OQ)));
#elif defined(__SSE2__)
  return uint32_t(_mm_movemask_ps(_mm_cmpge_ps((__m128)s, (__m128)t)));
#else
  const vi m = s >= t;
  uint32_t r = 0;
  for (int l = 0; l < W; ++l) r |= (m[l] ? 1u : 0u) << l;
  return r;
#endif
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
#endif
}

inline bool allowed(const AllowList& a, int64_t q, int64_t id) {
  if (id < 0 || id >= a.n_ids) return false;
  const uint8_t* bits = a.data + q * a.stride_bytes;
  return a.packed ? ((bits[id >> 3] >> (id & 7)) & 1) != 0 : bits[id] != 0;
}

inline bool worse(float s, int64_t id, float s2, int64_t id2) {
  return s < s2 || (s == s2 && id > id2);
}

// Offers (score, row) to query q's heap. The caller has already checked score >= thresh[q].
inline void offer(const ScanJob& job, Heaps& h, int64_t q, int64_t row, float s) {
  if (q >= job.nq) return;  // padding lane (only reachable with an infinite score)
  const int64_t id = job.ids[row];
  if (job.allow.data && !allowed(job.allow, q, id)) return;
  float* hs = h.scores + q * h.cap;
  int64_t* hi = h.ids + q * h.cap;
  int64_t n = h.sizes[q];
  if (n < h.cap) {  // not full: sift up from the end
    int64_t pos = n;
    while (pos > 0) {
      const int64_t parent = (pos - 1) >> 1;
      if (!worse(s, id, hs[parent], hi[parent])) break;
      hs[pos] = hs[parent]; hi[pos] = hi[parent];
      pos = parent;
    }
    hs[pos] = s; hi[pos] = id;
    h.sizes[q] = ++n;
    if (n == h.cap) h.thresh[q] = hs[0];
    return;
  }
  if (worse(s, id, hs[0], hi[0])) return;
  int64_t pos = 0;  // replace the root (the worst kept) and sift down
  for (;;) {
    int64_t c = 2 * pos + 1;
    if (c >= n) break;
    if (c + 1 < n && worse(hs[c + 1], hi[c + 1], hs[c], hi[c])) ++c;
    if (!worse(hs[c], hi[c], s, id)) break;
    hs[pos] = hs[c]; hi[pos] = hi[c];
    pos = c;
  }
  hs[pos] = s; hi[pos] = id;
  h.thresh[q] = hs[0];
}

// Converts `rows` database rows starting at `row` to float32 into out (MR x dim), zero padding
// the rows after them so the register tile can always run full.
template <DType DT>
void rows_to_f32(const void* base, int64_t dim, int64_t row, int rows, int mr, float* out) {
  const int64_t dv = dim - dim % W;
  for (int i = 0; i < rows; ++i) {
    const int64_t off = (row + i) * dim;
    float* o = out + int64_t(i) * dim;
    int64_t d = 0;
    for (; d < dv; d += W) storef(o + d, load_vec<DT>(base, off + d));
    for (; d < dim; ++d) o[d] = load_scalar<DT>(base, off + d);
  }
  if (rows < mr) std::memset(out + int64_t(rows) * dim, 0, sizeof(float) * size_t(mr - rows) * size_t(dim));
}

template <int MR, int NV>
inline void panel_tile(const float* x, int64_t dim, const float* qp, vf (&acc)[MR][NV]) {
  constexpr int PW = NV * W;
#pragma GCC unroll 64
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vf{};
  for (int64_t d = 0; d < dim; ++d) {
    vf q[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) q[j] = loadf(qp + d * PW + j * W);
#pragma GCC unroll 64
    for (int i = 0; i < MR; ++i) {
      const vf xb = splat(x[i * dim + d]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += xb * q[j];
    }
  }
}

template <int MR, int NV, DType DT>
void scan_panel(const ScanJob& job, int64_t r0, int64_t r1, Heaps& h, float* scratch) {
  constexpr int PW = NV * W;
  const int64_t dim = job.dim;
  const int64_t npanels = (job.nq + PW - 1) / PW;
  for (int64_t r = r0; r < r1; r += MR) {
    const int rows = int(r1 - r < MR ? r1 - r : MR);
    // Even float32 rows are copied: MR broadcasts from one contiguous L1-resident block beat MR
    // strided streams from memory (measured ~1.8x on 256 queries).
    rows_to_f32<DT>(job.base, dim, r, rows, MR, scratch);
    const float* x = scratch;
    for (int64_t p = 0; p < npanels; ++p) {
      vf acc[MR][NV];
      panel_tile<MR, NV>(x, dim, job.panels + p * dim * PW, acc);
      const float* th = h.thresh + p * PW;
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < NV; ++j) {
          uint32_t m = mask_ge(acc[i][j], loadf(th + j * W));
          while (m) {
            const int l = __builtin_ctz(m);
            m &= m - 1;
            offer(job, h, p * PW + j * W + l, r + i, acc[i][j][l]);
          }
        }
      }
    }
  }
}

template <int R, int G, DType DT>
inline void dot_rows(const ScanJob& job, int64_t r, Heaps& h) {
  const int64_t dim = job.dim;
  const int64_t dv = dim - dim % W;
  vf acc[R][G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = vf{};
  for (int64_t d = 0; d < dv; d += W) {
    vf q[G];
    for (int g = 0; g < G; ++g) q[g] = loadf(job.queries + g * dim + d);
    for (int i = 0; i < R; ++i) {
      const vf x = load_vec<DT>(job.base, (r + i) * dim + d);
      for (int g = 0; g < G; ++g) acc[i][g] += x * q[g];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int g = 0; g < G; ++g) {
      float s = hsum(acc[i][g]);
      for (int64_t d = dv; d < dim; ++d) s += load_scalar<DT>(job.base, (r + i) * dim + d) * job.queries[g * dim + d];
      if (s >= h.thresh[g]) offer(job, h, g, r + i, s);
    }
  }
}

template <int G, DType DT>
void scan_dot(const ScanJob& job, int64_t r0, int64_t r1, Heaps& h) {
  int64_t r = r0;
  for (; r + kDotRows <= r1; r += kDotRows) dot_rows<kDotRows, G, DT>(job, r, h);
  for (; r < r1; ++r) dot_rows<1, G, DT>(job, r, h);
}

template <DType DT>
void scan_dtype(const ScanJob& job, int64_t r0, int64_t r1, Heaps& h, float* scratch) {
  if (job.panel == 0) {
    switch (job.nq) {
      case 1: scan_dot<1, DT>(job, r0, r1, h); return;
      case 2: scan_dot<2, DT>(job, r0, r1, h); return;
      case 3: scan_dot<3, DT>(job, r0, r1, h); return;
      case 4: scan_dot<4, DT>(job, r0, r1, h); return;
      default: break;
    }
  }
  if (job.panel == W) scan_panel<MR1, 1, DT>(job, r0, r1, h, scratch);
  else scan_panel<MR2, 2, DT>(job, r0, r1, h, scratch);
}

void scan(const ScanJob& job, int64_t r0, int64_t r1, Heaps& h, float* scratch) {
  switch (job.dtype) {
    case DType::Float32: scan_dtype<DType::Float32>(job, r0, r1, h, scratch); break;
    case DType::Float16: scan_dtype<DType::Float16>(job, r0, r1, h, scratch); break;
    case DType::BFloat16: scan_dtype<DType::BFloat16>(job, r0, r1, h, scratch); break;
  }
}

int panel_width(int64_t nq) {
  if (nq <= kDotMaxQueries) return 0;
  return nq <= W ? W : 2 * W;
}

int64_t scratch_floats(int64_t dim) { return int64_t(MR1 > MR2 ? MR1 : MR2) * dim + W; }

// ---- conversions (add() and queries) ----

void f32_to_half_n(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && defined(__AVX2__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = float_to_half(in[i]);
}

void f32_to_bf16_n(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vu x = (vu)loadf(in + i);
    const vu isnan = (vu)((x & 0x7fffffffu) > 0x7f800000u);
    const vu rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const vu r = isnan ? ((x >> 16) | 0x40u) : rounded;
    const vh h = __builtin_convertvector(r, vh);
    std::memcpy(out + i, &h, sizeof h);
  }
  for (; i < n; ++i) out[i] = float_to_bf16(in[i]);
}

template <DType DT>
void to_f32_n(const void* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) storef(out + i, load_vec<DT>(in, i));
  for (; i < n; ++i) out[i] = load_scalar<DT>(in, i);
}

int64_t first_nonfinite(DType dt, const void* p, int64_t n) {
  if (dt == DType::Float32) {
    const uint32_t* u = static_cast<const uint32_t*>(p);
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      vu v; std::memcpy(&v, u + i, sizeof v);
      const vu bad = (v & 0x7f800000u) == 0x7f800000u;
      vu any = bad;
      bool hit = false;
      for (int l = 0; l < W; ++l) hit |= any[l] != 0;
      if (hit) break;
    }
    for (; i < n; ++i) if ((u[i] & 0x7f800000u) == 0x7f800000u) return i;
    return -1;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p);
  const uint16_t expo = dt == DType::Float16 ? 0x7c00u : 0x7f80u;
  for (int64_t i = 0; i < n; ++i) if ((h[i] & expo) == expo) return i;
  return -1;
}

int64_t convert(DType src, DType dst, const void* in, void* out, int64_t n) {
  constexpr int64_t kChunk = 4096;  // staging through float32 keeps the chunk in L1
  if (src == dst) {
    std::memcpy(out, in, size_t(n) * (src == DType::Float32 ? 4 : 2));
  } else if (dst == DType::Float32) {
    if (src == DType::Float16) to_f32_n<DType::Float16>(in, static_cast<float*>(out), n);
    else to_f32_n<DType::BFloat16>(in, static_cast<float*>(out), n);
  } else if (src == DType::Float32) {
    if (dst == DType::Float16) f32_to_half_n(static_cast<const float*>(in), static_cast<uint16_t*>(out), n);
    else f32_to_bf16_n(static_cast<const float*>(in), static_cast<uint16_t*>(out), n);
  } else {
    alignas(64) float tmp[kChunk];
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t m = n - i < kChunk ? n - i : kChunk;
      const uint16_t* s = static_cast<const uint16_t*>(in) + i;
      if (src == DType::Float16) to_f32_n<DType::Float16>(s, tmp, m);
      else to_f32_n<DType::BFloat16>(s, tmp, m);
      uint16_t* o = static_cast<uint16_t*>(out) + i;
      if (dst == DType::Float16) f32_to_half_n(tmp, o, m);
      else f32_to_bf16_n(tmp, o, m);
    }
  }
  return first_nonfinite(dst, out, n);
}

const KernelTable kTable = {CLINVLA_ISA_NAME, &panel_width, &scratch_floats, &scan, &convert};

}  // namespace
}  // namespace CLINVLA_ISA_NS
}  // namespace detail
}  // namespace clinvla
