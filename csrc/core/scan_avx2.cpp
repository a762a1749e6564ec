// The scan kernels for x86-64-v3 (AVX2, FMA, F16C). The build compiles this file alone with
// -mavx2 -mfma -mf16c; dispatch.cpp only calls it on CPUs that report those features.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CLINVLA_ISA_NS isa_avx2
#define CLINVLA_ISA_NAME "avx2"
#include "scan_impl.hpp"
#endif
#include "scan.hpp"

namespace clinvla {
namespace detail {
const KernelTable* kernel_table_avx2() {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return &isa_avx2::kTable;
#else
  return nullptr;  // built without the flags (non-x86 target or a plain compiler invocation)
#endif
}
}  // namespace detail
}  // namespace clinvla
