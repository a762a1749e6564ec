// clinvla::Engine: an engine bundle loaded in C++ through libtorch (the only translation unit,
// with the optional trt_runner.cpp, that includes libtorch's headers: they take most of the build).
//
// Mirrors clinvla_engine/runtime/engine.py: the same bundle checks (bundle.cpp), the same
// preprocessing (clinvla_engine/data/transforms.py::preprocess, with the same ATen resampling op),
// the same batching into the bundle's buckets and the same token-id cutting (graphs.truncate_tokens).
#include "clinvla/engine.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>

#include "../core/internal.hpp"
#include "bundle.hpp"
#include "clinvla/engine.h"
#include "runner.hpp"

#ifndef CLINVLA_ENGINE_VERSION
#error "CLINVLA_ENGINE_VERSION (the clinvla_engine release bundles must match) is set by csrc/CMakeLists.txt"
#endif
#ifndef CLINVLA_TORCH_VERSION
#error "CLINVLA_TORCH_VERSION (torch.__version__ of the libtorch linked) is set by csrc/CMakeLists.txt"
#endif

namespace clinvla {
namespace detail {
namespace {

// ---- safetensors (AOTInductor packages built with external constants) -----------------------
at::ScalarType safetensors_dtype(const std::string& name, const std::string& file) {
  static const std::unordered_map<std::string, at::ScalarType> kTypes = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  auto it = kTypes.find(name);
  if (it == kTypes.end()) fail(ErrorCode::Format, file, ": safetensors dtype ", name, " is not supported");
  return it->second;
}

std::unordered_map<std::string, at::Tensor> read_safetensors(const std::string& path, const c10::Device& device) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) fail(ErrorCode::IO, "cannot open ", path);
  const int64_t size = int64_t(in.tellg());
  in.seekg(0);
  uint8_t head[8];
  if (size < 8 || !in.read(reinterpret_cast<char*>(head), 8)) fail(ErrorCode::Format, path, " is not a safetensors file");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | head[i];
  if (header_len > uint64_t(size - 8) || header_len > (100u << 20))
    fail(ErrorCode::Format, path, ": safetensors header of ", header_len, " bytes does not fit the file");
  std::string header(header_len, '\0');
  in.read(&header[0], std::streamsize(header_len));
  const int64_t data_start = 8 + int64_t(header_len), data_len = size - data_start;
  std::vector<char> data(static_cast<size_t>(data_len));
  if (!in.read(data.data(), data_len)) fail(ErrorCode::Format, path, ": truncated safetensors file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::Format, path, ": safetensors header is not JSON (", e.what(), ")");
  }
  std::unordered_map<std::string, at::Tensor> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto& e = it.value();
    const at::ScalarType dtype = safetensors_dtype(e.at("dtype").get<std::string>(), path);
    std::vector<int64_t> shape = e.at("shape").get<std::vector<int64_t>>();
    const auto offsets = e.at("data_offsets").get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    if (offsets.size() != 2 || offsets[0] < 0 || offsets[1] > data_len ||
        offsets[1] - offsets[0] != numel * int64_t(c10::elementSize(dtype)))
      fail(ErrorCode::Format, path, ": tensor ", it.key(), " has data offsets outside the file or of the wrong size");
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
    std::memcpy(t.data_ptr(), data.data() + offsets[0], size_t(offsets[1] - offsets[0]));
    out.emplace(it.key(), device.is_cpu() ? t : t.to(device));
  }
  return out;
}

// ---- AOTInductor ----------------------------------------------------------------------------
// libtorch's package loader extracts each .pt2 into a fresh $TMPDIR/aotinductor_* folder and removes
// it only in its destructor, which a process killed while holding the engine never runs (an Orthanc
// stopped by SIGKILL leaked one folder per package, 12 MB for the `small` image package). The folder
// is found by the shared object the load maps (the loader does not expose it), one load at a time
// in this library; the same rule as clinvla_engine/runtime/runners.py::load_aoti_package.
std::set<std::string> mapped_aoti_folders() {
  std::set<std::string> folders;
  std::ifstream maps("/proc/self/maps");  // absent off Linux: nothing found, nothing removed
  std::string line;
  const std::string marker = "/aotinductor_", so = ".so";
  while (std::getline(maps, line)) {
    const size_t start = line.find('/');  // address perms offset dev inode hold no '/'
    if (start == std::string::npos) continue;
    const std::string path = line.substr(start);  // a removed file reads "... (deleted)": skipped
    const size_t at = path.find(marker);
    if (at == std::string::npos || path.size() < so.size() || path.compare(path.size() - so.size(), so.size(), so))
      continue;
    folders.insert(path.substr(0, path.find('/', at + marker.size())));
  }
  return folders;
}

std::mutex& aoti_load_mutex() {
  static std::mutex m;
  return m;
}

class AotiRunner final : public GraphRunner {
 public:
  AotiRunner(const Manifest& m, const GraphSpec& g, const c10::Device& device) {
    const std::string path = m.directory + "/" + g.file;
    try {
      std::lock_guard<std::mutex> lock(aoti_load_mutex());
      const std::set<std::string> before = mapped_aoti_folders();
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          path, "model", /*run_single_threaded=*/false, /*num_runners=*/1,
          device.is_cuda() ? device.index() : c10::DeviceIndex(-1));
      // On the CPU the kernels are compiled into the mapped shared object and nothing else is read
      // from the folder, so it goes at once. On CUDA kernel binaries may be read on first use: the
      // folder stays until the loader's destructor removes it.
      if (!device.is_cuda()) {
        for (const std::string& folder : mapped_aoti_folders()) {
          std::error_code ignored;
          if (!before.count(folder)) std::filesystem::remove_all(folder, ignored);
        }
      }
    } catch (const std::exception& e) {
      fail(ErrorCode::Format, "engine bundle ", m.directory, ": libtorch could not load the AOTInductor package ",
           g.file, " (", first_line(e.what()), "); rebuild the engine with clinvla-build-engine --backend aoti "
           "where this libtorch (", CLINVLA_TORCH_VERSION, ") is installed");
    }
    if (!g.constants.empty()) {
      // Built with aot_inductor.package_constants_in_so=False: the weights come from the bundle's
      // safetensors file, as runners.load_aoti_package loads them in Python.
      auto tensors = read_safetensors(m.directory + "/" + g.constants, device);
      std::unordered_map<std::string, at::Tensor> wanted;
      std::vector<std::string> missing;
      for (const std::string& fqn : loader_->get_constant_fqns()) {
        auto it = tensors.find(fqn);
        if (it == tensors.end()) missing.push_back(fqn);
        else wanted.emplace(fqn, it->second);
      }
      if (!missing.empty())
        fail(ErrorCode::Format, "engine bundle ", m.directory, ": ", g.constants, " lacks ", missing.size(),
             " constants the package needs (", missing[0], ", ...); rebuild the engine");
      try {
        loader_->load_constants(wanted, /*use_inactive=*/false, /*check_full_update=*/true);
      } catch (const std::exception& e) {
        fail(ErrorCode::Unsupported, "engine bundle ", m.directory, ": libtorch ", CLINVLA_TORCH_VERSION,
             " could not load the external constants ", g.constants, " (", first_line(e.what()),
             "); rebuild the engine with clinvla-build-engine --backend aoti --aoti-constants so");
      }
    }
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override { return loader_->run(inputs); }

  static std::string first_line(const std::string& s) { return s.substr(0, std::min(s.find('\n'), size_t(300))); }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace

std::unique_ptr<GraphRunner> make_aoti_runner(const Manifest& m, const GraphSpec& g, const c10::Device& device) {
  return std::make_unique<AotiRunner>(m, g, device);
}

}  // namespace detail

// ---- Engine -------------------------------------------------------------------------------------
using detail::fail;

struct Engine::Impl {
  detail::Manifest manifest;
  detail::SpecialIds special;
  c10::Device device{c10::kCPU};
  std::unique_ptr<detail::GraphRunner> image, text;
  std::mutex image_lock, text_lock;  // a runner is called by one thread at a time (as in Python)
  clinvla_tokenizer* tokenizer = nullptr;

  ~Impl() {
#ifdef CLINVLA_HAVE_TOKENIZER
    clinvla_tokenizer_free(tokenizer);
#endif
  }

  int64_t bucket(int64_t n) const {
    for (int64_t b : manifest.batch_sizes)
      if (b >= n) return b;
    return manifest.batch_sizes.back();
  }

  // transforms.preprocess on a float grey image: shorter side to S (bilinear, antialiased,
  // align_corners=False: the op F.interpolate calls), centre crop, (x - mean) / std, 3 channels.
  void preprocess(const GreyImage& img, at::Tensor slot, const char* what, int64_t index) const {
    if (!img.data) fail(ErrorCode::Invalid, what, "[", index, "] has no pixel data");
    const int64_t stride = img.row_stride ? img.row_stride : img.width;
    if (img.height < 8 || img.width < 8)
      fail(ErrorCode::Invalid, what, "[", index, "]: image of (", img.height, ", ", img.width,
           ") pixels is too small to be a radiograph");
    if (stride < img.width)
      fail(ErrorCode::Invalid, what, "[", index, "]: row stride ", stride, " floats is less than the width ", img.width);
    const int64_t h = img.height, w = img.width, size = manifest.image_size;
    at::Tensor grey = at::from_blob(const_cast<float*>(img.data), {1, 1, h, w}, {h * stride, h * stride, stride, 1},
                                    at::TensorOptions().dtype(at::kFloat));
    const double scale = double(size) / double(std::min(h, w));
    // Python's round(): half to even, as nearbyint in the default rounding mode
    const int64_t nh = std::max<int64_t>(size, int64_t(std::nearbyint(double(h) * scale)));
    const int64_t nw = std::max<int64_t>(size, int64_t(std::nearbyint(double(w) * scale)));
    at::Tensor x = at::_upsample_bilinear2d_aa(grey, {nh, nw}, /*align_corners=*/false, c10::nullopt, c10::nullopt)[0][0];
    const int64_t top = (nh - size) / 2, left = (nw - size) / 2;
    x = x.slice(0, top, top + size).slice(1, left, left + size);
    x = (x - manifest.pixel_mean) / manifest.pixel_std;
    slot.copy_(x.unsqueeze(0).expand({3, size, size}));
  }

  std::vector<at::Tensor> run_graph(detail::GraphRunner& runner, std::mutex& lock, std::vector<at::Tensor> inputs,
                                    int64_t m) {
    if (runner.static_shapes()) {
      const int64_t rows = bucket(m);
      if (rows != m)
        for (auto& t : inputs) {  // repeat the last row: padding rows are valid inputs, never NaN
          std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
          shape[0] = rows - m;
          t = at::cat({t, t.slice(0, m - 1, m).expand(shape)});
        }
    }
    for (auto& t : inputs) t = t.to(device).contiguous();
    std::vector<at::Tensor> out;
    {
      std::lock_guard<std::mutex> guard(lock);
      out = runner.run(inputs);
    }
    return out;
  }

  void take_embeddings(const at::Tensor& emb_any, int64_t m, float* out, const char* graph) const {
    const int64_t e = manifest.embed_dim;
    at::Tensor emb = emb_any.to(at::kCPU).to(at::kFloat).contiguous();
    if (emb.dim() != 2 || emb.size(0) < m || emb.size(1) != e)
      fail(ErrorCode::Internal, "the ", graph, " graph returned ", emb.sizes(), " where (", m, ", ", e, ") was expected");
    emb = emb.slice(0, 0, m);
    if (!at::isfinite(emb).all().item<bool>())
      fail(ErrorCode::Internal, "the ", graph, " graph of ", manifest.directory,
           " produced non-finite embeddings; the bundle or its inputs are broken");
    std::memcpy(out, emb.data_ptr<float>(), size_t(m * e) * sizeof(float));
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;
Engine::~Engine() = default;

Engine Engine::load(const std::string& bundle_dir, const Options& options) {
  auto impl = std::make_unique<Impl>();
  detail::Manifest& m = impl->manifest;
  m = detail::read_manifest(bundle_dir);
  if (m.backend == "tensorrt") {
#ifndef CLINVLA_WITH_TENSORRT
    fail(ErrorCode::Unsupported, "engine bundle ", bundle_dir, " is a tensorrt engine, but this libclinvla was built "
         "without TensorRT; rebuild libclinvla with -DCLINVLA_WITH_TENSORRT=ON where TensorRT is installed, or build "
         "the engine with clinvla-build-engine --backend aoti");
#endif
  } else if (m.backend != "aoti") {
    fail(ErrorCode::Unsupported, "engine bundle ", bundle_dir, " is a ", m.backend, " engine; libclinvla runs "
         "AOTInductor bundles (and TensorRT ones where built with TensorRT): build one with clinvla-build-engine "
         "--backend aoti");
  }
  detail::check_versions(m, {CLINVLA_ENGINE_VERSION, CLINVLA_TORCH_VERSION});
  detail::verify_files(m, options.verify);

  const std::string want = options.device.empty() ? m.device : options.device;
  try {
    impl->device = c10::Device(want);
  } catch (const std::exception&) {
    fail(ErrorCode::Invalid, "device must be \"cpu\", \"cuda\" or \"cuda:N\", got \"", want, "\"");
  }
  if (!impl->device.is_cpu() && !impl->device.is_cuda())
    fail(ErrorCode::Invalid, "device must be \"cpu\", \"cuda\" or \"cuda:N\", got \"", want, "\"");
  const std::string type = impl->device.is_cuda() ? "cuda" : "cpu";
  if (type != m.device)
    fail(ErrorCode::Invalid, "engine bundle ", bundle_dir, " was compiled for ", m.device, " (", m.backend,
         "); it cannot run on ", type, ": rebuild it with --device ", type);
  if (impl->device.is_cuda()) {
    if (!at::hasCUDA())
      fail(ErrorCode::Unsupported, "engine bundle ", bundle_dir, " runs on CUDA, but the libtorch libclinvla uses "
           "has no CUDA (or no GPU is visible); install a CUDA build of torch and rebuild libclinvla (make cpp)");
    if (!impl->device.has_index()) impl->device.set_index(0);
  }
  impl->special = detail::vocab_special_ids(m.directory + "/" + m.vocab);

  if (m.backend == "aoti") {
    impl->image = detail::make_aoti_runner(m, m.image, impl->device);
    impl->text = detail::make_aoti_runner(m, m.text, impl->device);
  } else {
#ifdef CLINVLA_WITH_TENSORRT
    impl->image = detail::make_trt_runner(m, m.image, impl->device);
    impl->text = detail::make_trt_runner(m, m.text, impl->device);
#endif
  }
#ifdef CLINVLA_HAVE_TOKENIZER
  if (clinvla_tokenizer_load((m.directory + "/" + m.vocab).c_str(), m.lowercase ? 1 : 0,
                             int32_t(m.tokenizer_max_length), &impl->tokenizer) != CLINVLA_OK)
    fail(ErrorCode::Format, "engine bundle ", bundle_dir, ": its tokenizer ", m.vocab, " does not load: ",
         clinvla_last_error());
#endif
  return Engine(std::move(impl));
}

int64_t Engine::dim() const { return impl_->manifest.embed_dim; }
int32_t Engine::image_size() const { return int32_t(impl_->manifest.image_size); }
bool Engine::two_views() const { return impl_->manifest.num_views == 2; }
int64_t Engine::max_text_len() const { return impl_->manifest.max_text_len; }
const std::string& Engine::backend() const { return impl_->manifest.backend; }
const std::string& Engine::directory() const { return impl_->manifest.directory; }
std::string Engine::device() const { return impl_->device.str(); }
std::string Engine::vocab_path() const { return impl_->manifest.directory + "/" + impl_->manifest.vocab; }
bool Engine::lowercase() const { return impl_->manifest.lowercase; }
int64_t Engine::tokenizer_max_length() const { return impl_->manifest.tokenizer_max_length; }
int64_t Engine::pad_id() const { return impl_->special.pad; }
int64_t Engine::sep_id() const { return impl_->special.sep; }
const clinvla_tokenizer* Engine::tokenizer_handle() const { return impl_->tokenizer; }

void Engine::embed_studies(int64_t n, const GreyImage* const* frontal, const GreyImage* const* lateral, float* out) {
  Impl& I = *impl_;
  if (n < 1) fail(ErrorCode::Invalid, "embed_studies: n must be >= 1 (give at least one study), got ", n);
  if (!frontal) fail(ErrorCode::Invalid, "embed_studies: frontal is a null pointer");
  if (!out) fail(ErrorCode::Invalid, "embed_studies: out is a null pointer");
  const bool two = I.manifest.num_views == 2;
  if (lateral && !two)
    for (int64_t i = 0; i < n; ++i)
      if (lateral[i])
        fail(ErrorCode::Invalid, "this engine's model takes the frontal view only: lateral[", i, "] must be null");
  for (int64_t i = 0; i < n; ++i)
    if (!frontal[i]) fail(ErrorCode::Invalid, "embed_studies: frontal[", i, "] is a null pointer; every study needs a frontal view");
  c10::InferenceMode guard;
  const int64_t s = I.manifest.image_size, step = I.manifest.batch_sizes.back(), e = I.manifest.embed_dim;
  for (int64_t start = 0; start < n; start += step) {
    const int64_t m = std::min(step, n - start);
    at::Tensor f = at::zeros({m, 3, s, s}, at::kFloat);
    for (int64_t i = 0; i < m; ++i) I.preprocess(*frontal[start + i], f[i], "frontal", start + i);
    std::vector<at::Tensor> inputs{f};
    if (two) {
      at::Tensor lat = at::zeros({m, 3, s, s}, at::kFloat), present = at::zeros({m}, at::kFloat);
      for (int64_t i = 0; lateral && i < m; ++i)
        if (lateral[start + i]) {
          I.preprocess(*lateral[start + i], lat[i], "lateral", start + i);
          present[i] = 1.0f;
        }
      inputs.push_back(lat);
      inputs.push_back(present);
    }
    auto result = I.run_graph(*I.image, I.image_lock, std::move(inputs), m);
    if (result.empty()) fail(ErrorCode::Internal, "the image graph returned no outputs");
    I.take_embeddings(result[0], m, out + start * e, "image");
  }
}

void Engine::embed_token_ids(const std::vector<std::vector<int64_t>>& ids, float* out) {
  Impl& I = *impl_;
  const int64_t n = int64_t(ids.size());
  if (n < 1) fail(ErrorCode::Invalid, "embed_token_ids: give at least one token sequence");
  if (!out) fail(ErrorCode::Invalid, "embed_token_ids: out is a null pointer");
  // Tokenizer(texts): padded to the longest; graphs.truncate_tokens: cut to max_text_len, a cut
  // row still ends in [SEP]; at least 3 tokens.
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i].size() < 2) fail(ErrorCode::Invalid, "token sequence ", i, " has ", ids[i].size(),
                                " ids; a tokenized text has at least [CLS] and [SEP]");
    for (int64_t t : ids[i])
      if (t < 0 || t >= I.special.size)
        fail(ErrorCode::Invalid, "token sequence ", i, " holds id ", t, ", outside the vocabulary of ", I.special.size);
    longest = std::max<int64_t>(longest, int64_t(ids[i].size()));
  }
  const int64_t length = std::max<int64_t>(3, std::min(longest, I.manifest.max_text_len));
  c10::InferenceMode guard;
  at::Tensor input_ids = at::full({n, length}, I.special.pad, at::kLong);
  at::Tensor mask = at::zeros({n, length}, at::kLong);
  auto id_acc = input_ids.accessor<int64_t, 2>();
  auto mask_acc = mask.accessor<int64_t, 2>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = std::min<int64_t>(int64_t(ids[i].size()), length);
    for (int64_t j = 0; j < len; ++j) {
      id_acc[i][j] = ids[i][j];
      mask_acc[i][j] = 1;
    }
    if (int64_t(ids[i].size()) > length) id_acc[i][length - 1] = I.special.sep;
  }
  const int64_t step = I.manifest.batch_sizes.back(), e = I.manifest.embed_dim;
  for (int64_t start = 0; start < n; start += step) {
    const int64_t m = std::min(step, n - start);
    std::vector<at::Tensor> inputs{input_ids.slice(0, start, start + m), mask.slice(0, start, start + m)};
    if (I.text->static_shapes() && length < I.manifest.max_text_len) {
      const int64_t extra = I.manifest.max_text_len - length;
      inputs[0] = at::cat({inputs[0], at::full({m, extra}, I.special.pad, at::kLong)}, 1);
      inputs[1] = at::cat({inputs[1], at::zeros({m, extra}, at::kLong)}, 1);
    }
    auto result = I.run_graph(*I.text, I.text_lock, std::move(inputs), m);
    if (result.empty()) fail(ErrorCode::Internal, "the text graph returned no outputs");
    I.take_embeddings(result[0], m, out + start * e, "text");
  }
}

std::vector<int64_t> Engine::tokenize(const std::string& report) const {
#ifdef CLINVLA_HAVE_TOKENIZER
  // as Python's Engine.tokenize: the cleaned text must keep words (a report of headers only has none)
  const std::string clean = report_text(report);
  if (clean.empty())
    fail(ErrorCode::Invalid, "the report text is empty", report.empty() ? "" : " once its section headers are removed",
         "; every text needs words");
  std::vector<int32_t> buf(static_cast<size_t>(std::max<int64_t>(impl_->manifest.tokenizer_max_length, 3)));
  int64_t count = 0;
  if (clinvla_tokenize(impl_->tokenizer, clean.c_str(), buf.data(), int64_t(buf.size()), &count) != CLINVLA_OK)
    fail(ErrorCode::Invalid, "cannot tokenize the report: ", clinvla_last_error());
  return std::vector<int64_t>(buf.begin(), buf.begin() + count);
#else
  (void)report;
  fail(ErrorCode::Unsupported, "this libclinvla was built without its WordPiece tokenizer "
       "(csrc/libclinvla/tokenizer.cpp was missing at configure time); rebuild it with make cpp");
#endif
}

void Engine::embed_texts(const std::vector<std::string>& reports, float* out) {
  std::vector<std::vector<int64_t>> ids;
  ids.reserve(reports.size());
  for (const auto& r : reports) ids.push_back(tokenize(r));
  embed_token_ids(ids, out);
}

std::string report_text(const std::string& utf8_report) { return detail::report_text(utf8_report); }

}  // namespace clinvla
