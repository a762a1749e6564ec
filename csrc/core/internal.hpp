// Internal helpers shared by the CPU core, the CUDA code and the bindings (not installed).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "clinvla/index.hpp"
#include "half.hpp"

namespace clinvla {
namespace detail {

// The calling thread's clinvla_last_error() message (defined in c_api.cpp).
void set_last_error(const std::string& message);

// One piece of a message. Integers are written with std::to_string, not through an ostream: on the
// GPU machine a message built by the CUDA unit through ostringstream came out without its numbers
// ("query  has a NaN ..."), and to_string does not depend on the stream's locale facets.
template <typename T>
void append_piece(std::string& out, const T& v) {
  using D = std::decay_t<T>;
  if constexpr (std::is_same_v<D, char>) {
    out.push_back(v);
  } else if constexpr (std::is_integral_v<D> && !std::is_same_v<D, bool>) {
    out += std::to_string(v);
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    out.append(std::string_view(v));
  } else {
    std::ostringstream os;
    os << v;
    out += os.str();
  }
}

template <typename... Args>
std::string cat(Args&&... args) {
  std::string out;
  (append_piece(out, args), ...);
  return out;
}

template <typename... Args>
[[noreturn]] void fail(ErrorCode code, Args&&... args) {
  throw Error(code, cat(std::forward<Args>(args)...));
}

inline bool valid_dtype(int32_t code) { return code >= 0 && code <= 2; }

// 1234567 -> "1,234,567" (file-size messages)
std::string with_commas(uint64_t v);

static inline float load_as_float(DType dt, const void* base, int64_t i) {
  switch (dt) {
    case DType::Float32: return static_cast<const float*>(base)[i];
    case DType::Float16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

// A 64-byte aligned growable byte buffer (vectors are read with wide SIMD loads).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  ~AlignedBuffer() { std::free(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : ptr_(o.ptr_), size_(o.size_), cap_(o.cap_) {
    o.ptr_ = nullptr; o.size_ = o.cap_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_); std::swap(size_, o.size_); std::swap(cap_, o.cap_);
    return *this;
  }
  uint8_t* data() { return ptr_; }
  const uint8_t* data() const { return ptr_; }
  size_t size() const { return size_; }
  void reserve(size_t bytes);
  void resize(size_t bytes) { reserve(bytes); size_ = bytes; }
  void grow_to(size_t bytes);  // resize with amortised (x1.5) capacity growth
  void clear() { size_ = 0; }

 private:
  uint8_t* ptr_ = nullptr;
  size_t size_ = 0, cap_ = 0;
};

uint32_t crc32c_update(uint32_t crc, const void* data, size_t n);

}  // namespace detail
}  // namespace clinvla
