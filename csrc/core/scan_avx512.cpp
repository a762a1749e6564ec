// The scan kernels for x86-64-v4 (AVX-512 F/BW/DQ/VL with FMA and F16C). The build compiles this
// file alone with those -m flags; dispatch.cpp only calls it on CPUs that report them.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CLINVLA_ISA_NS isa_avx512
#define CLINVLA_ISA_NAME "avx512"
#include "scan_impl.hpp"
#define CLINVLA_HAVE_AVX512_TABLE 1
#endif
#include "scan.hpp"

namespace clinvla {
namespace detail {
const KernelTable* kernel_table_avx512() {
#ifdef CLINVLA_HAVE_AVX512_TABLE
  return &isa_avx512::kTable;
#else
  return nullptr;
#endif
}
}  // namespace detail
}  // namespace clinvla
