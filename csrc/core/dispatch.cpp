// Picks the CPU kernel variant once, from what the CPU reports (x86-64-v4 > v3 > baseline).
// CLINVLA_CPU_ISA=generic|avx2|avx512 (or set_cpu_isa) asks for a specific one, e.g. to compare
// variants in tests; asking for one the CPU lacks is an error, never a crash.
#include <atomic>
#include <cstdlib>
#include <string>

#include "internal.hpp"
#include "scan.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace clinvla {
namespace detail {
namespace {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const KernelTable* table_for(const std::string& name) {
  if (name == "generic") return kernel_table_generic();
  if (name == "avx2") return cpu_has_avx2() ? kernel_table_avx2() : nullptr;
  if (name == "avx512") return cpu_has_avx512() ? kernel_table_avx512() : nullptr;
  return nullptr;
}

const KernelTable* best_table() {
  if (const char* env = std::getenv("CLINVLA_CPU_ISA")) {
    if (*env) {
      if (const KernelTable* t = table_for(env)) return t;
      // An unusable request falls back to the best variant rather than failing at import.
    }
  }
  if (const KernelTable* t = table_for("avx512")) return t;
  if (const KernelTable* t = table_for("avx2")) return t;
  return kernel_table_generic();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{best_table()};
  return table;
}

}  // namespace

const KernelTable& kernels() { return *current().load(std::memory_order_acquire); }

}  // namespace detail

const char* cpu_isa() { return detail::kernels().name; }

void set_cpu_isa(const std::string& name) {
  const detail::KernelTable* t = detail::table_for(name);
  if (!t) {
    detail::fail(ErrorCode::Unsupported, "CPU kernel variant '", name,
                 "' is not available here (built variants the CPU supports: generic",
                 detail::table_for("avx2") ? ", avx2" : "", detail::table_for("avx512") ? ", avx512" : "",
                 ")");
  }
  detail::current().store(t, std::memory_order_release);
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace clinvla
