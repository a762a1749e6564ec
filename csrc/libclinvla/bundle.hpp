// An engine bundle's manifest, read and checked in C++ (torch-free) the way
// clinvla_engine/runtime/bundle.py does: the manifest's shape, the "complete" mark, the versions the
// backend depends on, and a folder holding exactly the listed files with their sizes and SHA-256.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace clinvla {
namespace detail {

struct TensorSpec {
  std::string name;
  std::string dtype;  // "float32" | "int64"
};

struct GraphSpec {
  std::string file;       // relative name of the graph (.pt2, .plan, ...)
  std::string constants;  // AOTInductor packages built with external constants: a .safetensors file
  std::string packaging;  // "constants_in_so" | "external_constants" | "" (not recorded)
  std::vector<TensorSpec> inputs, outputs;
  std::vector<int64_t> profiles;  // TensorRT: one optimisation profile per batch bucket
};

struct Manifest {
  std::string directory;  // as given (messages name it)
  std::string backend, device, precision;
  std::vector<int64_t> batch_sizes;  // increasing
  int64_t max_text_len = 0;
  int64_t image_size = 0, patch_size = 0, num_views = 0, embed_dim = 0;
  double pixel_mean = 0, pixel_std = 1;
  std::string vocab;  // relative name of the tokenizer vocabulary
  bool lowercase = true;
  int64_t tokenizer_max_length = 0;
  GraphSpec image, text;
  std::map<std::string, std::string> versions;  // name -> version the bundle was built with
  std::map<std::string, std::pair<int64_t, std::string>> files;  // name -> (bytes, sha256)
};

// The version strings this build of libclinvla compares a bundle against (exact match, as the
// Python runtime's VERSION_RULES for aoti): clinvla_engine and torch.
struct BuildVersions {
  std::string clinvla_engine;
  std::string torch;
};

// Reads and validates manifest.json (BundleError-equivalent messages as clinvla::Error Format).
Manifest read_manifest(const std::string& directory);
// Refuses a bundle whose backend depends on a version that differs from this build (Format).
void check_versions(const Manifest& m, const BuildVersions& here);
// The folder holds exactly the listed files, each with its recorded size and (hash) SHA-256.
void verify_files(const Manifest& m, bool hash = true);
// Lowercase hex SHA-256 of a file (OpenSSL libcrypto).
std::string sha256_file(const std::string& path);

// report_text(): clinvla_engine.data.dataset.report_text in C++: section headers ("FINDINGS:")
// removed and whitespace collapsed, on UTF-8 text.
std::string report_text(const std::string& utf8);

// The ids of [PAD] and [SEP] in a vocabulary file, counted as the Python Tokenizer does (lines as
// str.splitlines() cuts them, empty lines skipped).
struct SpecialIds {
  int64_t pad = -1, sep = -1, cls = -1, unk = -1;
  int64_t size = 0;
};
SpecialIds vocab_special_ids(const std::string& vocab_path);

}  // namespace detail
}  // namespace clinvla
