// libclinvla: the ClinVLA engine in C++ (C++17; the C API over it is clinvla/engine.h).
//
//   clinvla::Engine engine = clinvla::Engine::load("/srv/engine");      // verifies every file's SHA-256
//   std::vector<float> emb(engine.dim());
//   clinvla::GreyImage frontal{pixels, height, width, width};          // display grey in [0, 1]
//   const clinvla::GreyImage* f = &frontal;
//   engine.embed_studies(1, &f, nullptr, emb.data());                  // L2-normalised
//
// The engine runs an AOTInductor bundle through libtorch (and a TensorRT bundle where libclinvla
// was built with TensorRT). This header does not include libtorch: an integrator's code compiles
// without its headers. Errors are thrown as clinvla::Error (clinvla/index.hpp) with a message that
// names the bundle, file or argument and the fix.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "clinvla/index.hpp"

struct clinvla_tokenizer;  // clinvla/engine.h

namespace clinvla {

// A caller-owned grey picture: float32 display grey in [0, 1] (bright = dense), row-major with
// row_stride floats between rows (>= width). Any size >= 8 x 8: the engine resizes and crops it.
struct GreyImage {
  const float* data = nullptr;
  int32_t height = 0;
  int32_t width = 0;
  int64_t row_stride = 0;  // in floats; 0 means width
};

class Engine {
 public:
  struct Options {
    std::string device;   // "cpu", "cuda", "cuda:N"; empty = the device the bundle was built for
    bool verify = true;   // hash every file (sizes and the file list are always checked)
  };

  // Loads and verifies a bundle directory written by clinvla-build-engine (--backend aoti, or
  // tensorrt where libclinvla was built with TensorRT).
  static Engine load(const std::string& bundle_dir, const Options& options);
  static Engine load(const std::string& bundle_dir) { return load(bundle_dir, Options()); }

  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;
  ~Engine();

  int64_t dim() const;          // global embedding size E
  int32_t image_size() const;   // model input side S
  bool two_views() const;       // the model takes a lateral view too
  int64_t max_text_len() const;
  const std::string& backend() const;
  const std::string& directory() const;
  std::string device() const;
  std::string vocab_path() const;  // the bundle's tokenizer vocabulary (verified with the rest)
  bool lowercase() const;
  int64_t tokenizer_max_length() const;
  int64_t pad_id() const;
  int64_t sep_id() const;
  // The bundle's tokenizer as a C handle (owned by the engine; null where libclinvla was built
  // without its tokenizer).
  const clinvla_tokenizer* tokenizer_handle() const;

  // Global embeddings of n studies into out (n, dim) float32, L2-normalised, as
  // clinvla_engine.runtime.Engine.embed_studies computes them. frontal[i] must be non-null;
  // lateral may be null (no study has one) or hold null entries (that study has none).
  // Thread-safe.
  void embed_studies(int64_t n, const GreyImage* const* frontal, const GreyImage* const* lateral, float* out);

  // Text embeddings of n token id sequences ([CLS] ... [SEP], as clinvla_tokenize gives them; cut
  // to max_text_len the way the Python engine cuts them) into out (n, dim). Thread-safe.
  void embed_token_ids(const std::vector<std::vector<int64_t>>& ids, float* out);

  // Text embeddings of n reports: report_text() cleaning, the bundle's WordPiece tokenizer, then
  // embed_token_ids. Needs libclinvla's tokenizer (Error Unsupported where it was not built).
  void embed_texts(const std::vector<std::string>& reports, float* out);
  std::vector<int64_t> tokenize(const std::string& report) const;  // cleaned + tokenized ids

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// clinvla_engine.data.dataset.report_text: the report without its section headers ("FINDINGS:",
// "IMPRESSION:") and with runs of whitespace collapsed to one space. UTF-8 in and out.
std::string report_text(const std::string& utf8_report);

}  // namespace clinvla
