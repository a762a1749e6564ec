// The portable scan kernels: baseline x86-64 (SSE2) or whatever the target's default vectors are.
#define CLINVLA_ISA_NS isa_generic
#define CLINVLA_ISA_NAME "generic"
#include "scan_impl.hpp"

namespace clinvla {
namespace detail {
const KernelTable* kernel_table_generic() { return &isa_generic::kTable; }
}  // namespace detail
}  // namespace clinvla
