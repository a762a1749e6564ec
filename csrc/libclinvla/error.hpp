// libclinvla's side of the C API's error convention: the same per-thread last-error string as the
// index core (csrc/core/c_api.cpp owns it; clinvla_last_error() reads it), and a guard that turns
// every C++ exception into a status so that none crosses into C code.
#pragma once

#include <new>
#include <string>

#include "clinvla/clinvla.h"
#include "clinvla/index.hpp"

namespace clinvla {
namespace detail {

// Defined next to the core's thread_local last-error string (csrc/core/c_api.cpp).
void set_last_error(const std::string& message);

template <typename F>
clinvla_status guarded_call(F&& f) noexcept {
  try {
    f();
    set_last_error(std::string());
    return CLINVLA_OK;
  } catch (const clinvla::Error& e) {
    set_last_error(e.what());
    return clinvla_status(int(e.code()));
  } catch (const std::bad_alloc&) {
    set_last_error("out of memory");
    return CLINVLA_ERR_NOMEM;
  } catch (const std::exception& e) {
    set_last_error(e.what());
    return CLINVLA_ERR_INTERNAL;
  } catch (...) {
    set_last_error("unknown error");
    return CLINVLA_ERR_INTERNAL;
  }
}

inline clinvla_status null_argument(const char* function, const char* what) noexcept {
  try {
    set_last_error(std::string(function) + ": " + what + " is a null pointer");
  } catch (...) {
  }
  return CLINVLA_ERR_INVALID;
}

}  // namespace detail
}  // namespace clinvla
