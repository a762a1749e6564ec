// The tokenizer's C API (engine.h, section "tokenizer"): status codes plus the per-thread last
// error (error.hpp), no C++ exception crosses into C.
#include <algorithm>
#include <new>
#include <string>
#include <vector>

#include "clinvla/engine.h"
#include "error.hpp"
#include "tokenizer.hpp"

struct clinvla_tokenizer {
  clinvla::Tokenizer tokenizer;
};

using clinvla::detail::guarded_call;
using clinvla::detail::null_argument;

extern "C" {

clinvla_status clinvla_tokenizer_load(const char* vocab_path, int lowercase, int32_t max_length,
                                      clinvla_tokenizer** out) {
  if (!out) return null_argument("clinvla_tokenizer_load", "out");
  *out = nullptr;
  if (!vocab_path) return null_argument("clinvla_tokenizer_load", "vocab_path");
  return guarded_call([&] {
    *out = new clinvla_tokenizer{clinvla::Tokenizer::from_file(vocab_path, lowercase != 0, max_length)};
  });
}

void clinvla_tokenizer_free(clinvla_tokenizer* tokenizer) { delete tokenizer; }

// On CLINVLA_ERR_INVALID because max_ids is too small, *n_ids still receives the count the text
// needs (at most max_length), so that a caller can size its buffer and call again.
clinvla_status clinvla_tokenize(const clinvla_tokenizer* tokenizer, const char* utf8_text, int32_t* ids,
                                int64_t max_ids, int64_t* n_ids) {
  if (!n_ids) return null_argument("clinvla_tokenize", "n_ids");
  *n_ids = 0;
  if (!tokenizer) return null_argument("clinvla_tokenize", "tokenizer");
  if (!utf8_text) return null_argument("clinvla_tokenize", "utf8_text");
  if (!ids && max_ids > 0) return null_argument("clinvla_tokenize", "ids");
  return guarded_call([&] {
    if (max_ids < 0) {
      throw clinvla::Error(clinvla::ErrorCode::Invalid,
                           "clinvla_tokenize: max_ids must be >= 0, got " + std::to_string(max_ids));
    }
    thread_local std::vector<int32_t> buffer;  // one per thread: clinvla_tokenize is thread-safe
    tokenizer->tokenizer.encode(utf8_text, buffer);
    const int64_t n = int64_t(buffer.size());
    if (n > max_ids) {
      *n_ids = n;
      throw clinvla::Error(clinvla::ErrorCode::Invalid,
                           "clinvla_tokenize: ids has room for " + std::to_string(max_ids) + " token ids, the text needs " +
                               std::to_string(n) + "; pass max_ids >= " + std::to_string(n) +
                               " (the tokenizer's max_length, " + std::to_string(tokenizer->tokenizer.max_length()) +
                               ", is always enough)");
    }
    std::copy(buffer.begin(), buffer.end(), ids);
    *n_ids = n;
  });
}

}  // extern "C"
