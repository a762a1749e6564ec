// Driver of the C++ WordPiece tokenizer for tests/test_tokenizer_cpp.py, through the C API only.
//
//   tokenize_main VOCAB LOWERCASE MAX_LENGTH [--nul] < texts
//       one output line of space-separated token ids per input record. Records are separated by
//       '\n' (with --nul by NUL bytes, so that a record may hold line breaks); a trailing separator
//       does not start another record. An empty record is an empty text, which gives
//       "[CLS] [SEP]" as Hugging Face does. A record the C API refuses prints
//       "ERROR <status>: <message>" instead.
//   tokenize_main --errors MISSING_PATH VOCAB
//       exercises the C API's error paths; one line per case: "<case> <status> <message>".
//   tokenize_main --bench VOCAB MAX_LENGTH < texts
//       tokenises every line once (after one warm-up pass) and prints "<lines> <seconds>".
//
// Built by the test with -DCLINVLA_TOKENIZE_STANDALONE from this file and the tokenizer's sources
// alone; that flag supplies the per-thread last-error string which the library proper keeps in
// csrc/core/c_api.cpp.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "clinvla/engine.h"

#ifdef CLINVLA_TOKENIZE_STANDALONE
namespace {
thread_local std::string g_last_error;
}
namespace clinvla {
namespace detail {
void set_last_error(const std::string& message) { g_last_error = message; }
}  // namespace detail
}  // namespace clinvla
extern "C" const char* clinvla_last_error(void) { return g_last_error.c_str(); }
#endif

namespace {

std::vector<std::string> read_records(char sep) {
  std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  std::vector<std::string> records;
  size_t pos = 0;
  while (pos < all.size()) {
    size_t end = all.find(sep, pos);
    if (end == std::string::npos) end = all.size();
    records.push_back(all.substr(pos, end - pos));
    pos = end + 1;
  }
  return records;
}

int run_tokenize(const char* vocab, int lowercase, int32_t max_length, char sep) {
  clinvla_tokenizer* tok = nullptr;
  const clinvla_status st = clinvla_tokenizer_load(vocab, lowercase, max_length, &tok);
  if (st != CLINVLA_OK) {
    std::fprintf(stderr, "tokenize_main: load failed with status %d: %s\n", int(st), clinvla_last_error());
    return 2;
  }
  std::vector<int32_t> ids(size_t(max_length) + 1);
  std::string out;
  for (const std::string& text : read_records(sep)) {
    int64_t n = 0;
    const clinvla_status st = clinvla_tokenize(tok, text.c_str(), ids.data(), int64_t(ids.size()), &n);
    if (st != CLINVLA_OK) {
      out += "ERROR " + std::to_string(int(st)) + ": " + clinvla_last_error() + "\n";
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      if (i) out += ' ';
      out += std::to_string(ids[size_t(i)]);
    }
    out += '\n';
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  clinvla_tokenizer_free(tok);
  return 0;
}

void report(const char* name, clinvla_status st) {
  std::printf("%s %d %s\n", name, int(st), st == CLINVLA_OK ? "" : clinvla_last_error());
}

int run_errors(const char* missing, const char* vocab) {
  clinvla_tokenizer* tok = nullptr;
  report("missing_vocab", clinvla_tokenizer_load(missing, 1, 64, &tok));
  report("missing_vocab_out_is_null", tok == nullptr ? CLINVLA_OK : CLINVLA_ERR_INTERNAL);
  report("null_path", clinvla_tokenizer_load(nullptr, 1, 64, &tok));
  report("null_out", clinvla_tokenizer_load(vocab, 1, 64, nullptr));
  report("max_length_1", clinvla_tokenizer_load(vocab, 1, 1, &tok));
  if (clinvla_tokenizer_load(vocab, 1, 64, &tok) != CLINVLA_OK) {
    report("load", CLINVLA_ERR_INTERNAL);
    return 1;
  }
  int32_t ids[64];
  int64_t n = -1;
  report("ok", clinvla_tokenize(tok, "small right pleural effusion.", ids, 64, &n));
  std::printf("ok_n %lld\n", (long long)n);
  n = -1;
  report("max_ids_too_small", clinvla_tokenize(tok, "small right pleural effusion.", ids, 3, &n));
  std::printf("max_ids_too_small_n %lld\n", (long long)n);
  report("max_ids_negative", clinvla_tokenize(tok, "x", ids, -1, &n));
  report("null_tokenizer", clinvla_tokenize(nullptr, "x", ids, 64, &n));
  report("null_text", clinvla_tokenize(tok, nullptr, ids, 64, &n));
  report("null_ids", clinvla_tokenize(tok, "x", nullptr, 64, &n));
  report("null_n_ids", clinvla_tokenize(tok, "x", ids, 64, nullptr));
  report("bad_utf8", clinvla_tokenize(tok, "caf\xC3(", ids, 64, &n));
  report("overlong_utf8", clinvla_tokenize(tok, "a\xC0\xAF", ids, 64, &n));
  report("surrogate_utf8", clinvla_tokenize(tok, "a\xED\xA0\x80", ids, 64, &n));
  // a success clears the last error
  report("ok_again", clinvla_tokenize(tok, "clear", ids, 64, &n));
  std::printf("last_error_after_ok [%s]\n", clinvla_last_error());
  clinvla_tokenizer_free(tok);
  clinvla_tokenizer_free(nullptr);  // a no-op
  return 0;
}

int run_bench(const char* vocab, int32_t max_length) {
  clinvla_tokenizer* tok = nullptr;
  if (clinvla_tokenizer_load(vocab, 1, max_length, &tok) != CLINVLA_OK) {
    std::fprintf(stderr, "tokenize_main: %s\n", clinvla_last_error());
    return 2;
  }
  const std::vector<std::string> lines = read_records('\n');
  std::vector<int32_t> ids(static_cast<size_t>(max_length));
  int64_t n = 0, total = 0;
  for (const std::string& t : lines) clinvla_tokenize(tok, t.c_str(), ids.data(), max_length, &n);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  for (const std::string& t : lines) {
    if (clinvla_tokenize(tok, t.c_str(), ids.data(), max_length, &n) != CLINVLA_OK) {
      std::fprintf(stderr, "tokenize_main: %s\n", clinvla_last_error());
      return 1;
    }
    total += n;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%zu %.6f %lld\n", lines.size(), s, (long long)total);
  clinvla_tokenizer_free(tok);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--errors" && argc == 4) return run_errors(argv[2], argv[3]);
  if (mode == "--bench" && argc == 4) return run_bench(argv[2], std::atoi(argv[3]));
  if ((argc == 4 || argc == 5) && mode.rfind("--", 0) != 0) {
    const bool nul = argc == 5 && std::string(argv[4]) == "--nul";
    if (argc == 5 && !nul) {
      std::fprintf(stderr, "tokenize_main: unknown option %s\n", argv[4]);
      return 2;
    }
    return run_tokenize(argv[1], std::atoi(argv[2]), std::atoi(argv[3]), nul ? '\0' : '\n');
  }
  std::fprintf(stderr,
               "usage: tokenize_main VOCAB LOWERCASE MAX_LENGTH [--nul] < texts\n"
               "       tokenize_main --errors MISSING_PATH VOCAB\n"
               "       tokenize_main --bench VOCAB MAX_LENGTH < texts\n");
  return 2;
}
