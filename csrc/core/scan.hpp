// The interface between the search driver (flat_index.cpp) and the CPU scan kernels, which are
// compiled once per instruction set (scan_generic.cpp, scan_avx2.cpp, scan_avx512.cpp) from
// scan_impl.hpp and picked at run time (dispatch.cpp).
//
// Only plain structs and function pointers cross this boundary: a kernel translation unit must not
// instantiate templates or inline functions that another unit also instantiates, or the linker
// could keep the AVX-512 copy and run it on a CPU without AVX-512.
#pragma once

#include <cstdint>

#include "clinvla/index.hpp"

namespace clinvla {
namespace detail {

// One thread's bounded heaps, one per query: a min-heap under (score, -id) so that the root is
// the worst result kept. thresh[q] is -inf until heap q is full, then the root's score; padding
// lanes of the last query panel hold +inf so they never produce candidates.
struct Heaps {
  float* scores;    // (nq, cap)
  int64_t* ids;     // (nq, cap)
  int64_t* sizes;   // (nq)
  float* thresh;    // (nq rounded up to the panel width)
  int64_t cap;      // min(k, number of vectors)
};

struct ScanJob {
  const void* base;        // database (N, dim) in dtype
  DType dtype;
  int64_t dim;
  const int64_t* ids;      // (N)
  const float* queries;    // (nq, dim) float32, row-major (dot kernel)
  const float* panels;     // (ceil(nq / panel), dim, panel) float32, zero padded (panel kernel)
  int64_t nq;
  int panel;               // 0: dot kernel; otherwise the panel width in queries
  AllowList allow;
};

struct KernelTable {
  const char* name;
  // Queries per panel for nq queries (0 selects the row-wise dot kernel, best for very few).
  int (*panel_width)(int64_t nq);
  // Floats of per-thread scratch the scan needs for this dimension.
  int64_t (*scratch_floats)(int64_t dim);
  // Scans database rows [r0, r1) against every query of the job, updating the heaps.
  void (*scan)(const ScanJob& job, int64_t r0, int64_t r1, Heaps& heaps, float* scratch);
  // Converts n values between dtypes; returns the index of the first value that is not finite
  // in the destination (NaN, infinite, or overflowed), or -1.
  int64_t (*convert)(DType src, DType dst, const void* in, void* out, int64_t n);
};

const KernelTable& kernels();
const KernelTable* kernel_table_generic();
const KernelTable* kernel_table_avx2();    // nullptr where not compiled
const KernelTable* kernel_table_avx512();  // nullptr where not compiled

}  // namespace detail
}  // namespace clinvla
