// Engine bundle manifest and file checks in C++ (see bundle.hpp). The messages follow
// clinvla_engine/runtime/bundle.py so that a PACS log and a Python traceback say the same thing.
#include "bundle.hpp"

#include <openssl/evp.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "../core/internal.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace clinvla {
namespace detail {
namespace {

const char* kManifest = "manifest.json";
const char* kRebuild = "rebuild the engine with clinvla-build-engine";

[[noreturn]] void bundle_error(const Manifest& m, const std::string& what) {
  fail(ErrorCode::Format, "engine bundle ", m.directory, ": ", what);
}

std::string shown(const json& j) {
  std::string s = j.dump();
  return s.size() > 120 ? s.substr(0, 120) : s;
}

[[noreturn]] void bad_field(const Manifest& m, const std::string& field, const std::string& want, const json* got) {
  bundle_error(m, cat(kManifest, " field ", field, " must be ", want, got ? ", got " + shown(*got) : std::string(),
                      "; the manifest was edited or damaged after the build: ", kRebuild));
}

bool is_int(const json& j) { return j.is_number_integer(); }  // JSON true/false are not numbers here

bool safe_relative_name(const std::string& name) {
  if (name.empty() || name.find('\\') != std::string::npos || name.find('\0') != std::string::npos ||
      name[0] == '/' || name == kManifest)
    return false;
  std::stringstream ss(name);
  std::string part;
  size_t parts = 0;
  for (size_t start = 0;;) {
    const size_t slash = name.find('/', start);
    part = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part.empty() || part == "." || part == "..") return false;
    ++parts;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return parts > 0;
}

GraphSpec read_graph(const Manifest& m, const json& graphs, const char* name, const std::string& suffix,
                     const std::vector<std::string>& want_in, const std::vector<std::string>& want_out) {
  const std::string where = cat("graphs.", name);
  const json& g = graphs.at(name);
  if (!g.is_object()) bad_field(m, where, "an object", &g);
  GraphSpec spec;
  const json file = g.value("file", json());
  if (!file.is_string() || !m.files.count(file.get<std::string>()) ||
      file.get<std::string>().size() < suffix.size() ||
      file.get<std::string>().compare(file.get<std::string>().size() - suffix.size(), suffix.size(), suffix) != 0)
    bad_field(m, where + ".file", cat("a listed ", suffix, " file (a ", m.backend, " bundle)"), &file);
  spec.file = file.get<std::string>();
  for (const char* extra : {"constants", "onnx", "weights"}) {
    if (g.contains(extra) && !(g[extra].is_string() && m.files.count(g[extra].get<std::string>())))
      bad_field(m, where + "." + extra, "the name of a listed file", &g[extra]);
  }
  if (g.contains("constants")) spec.constants = g["constants"].get<std::string>();
  if (g.contains("packaging") && g["packaging"].is_string()) spec.packaging = g["packaging"].get<std::string>();
  for (int side = 0; side < 2; ++side) {
    const char* key = side == 0 ? "inputs" : "outputs";
    const auto& want = side == 0 ? want_in : want_out;
    const json specs = g.value(key, json());
    bool ok = specs.is_array() && specs.size() == want.size();
    for (size_t i = 0; ok && i < specs.size(); ++i)
      ok = specs[i].is_object() && specs[i].value("name", json()) == json(want[i]);
    if (!ok) {
      std::string names = "[";
      for (size_t i = 0; i < want.size(); ++i) names += (i ? ", '" : "'") + want[i] + "'";
      bad_field(m, where + "." + key, cat("the tensors ", names, "] of a ", m.num_views, "-view model"), &specs);
    }
    for (const json& t : specs) {
      const json dtype = t.value("dtype", json()), shape = t.value("shape", json());
      bool good = (dtype == "float32" || dtype == "int64") && shape.is_array() && !shape.empty() &&
                  shape[0] == "batch";
      for (size_t i = 1; good && i < shape.size(); ++i)
        good = shape[i].is_string() || (is_int(shape[i]) && shape[i].get<int64_t>() >= 1);
      if (!good)
        bad_field(m, cat(where, ".", key, "[", t["name"].get<std::string>(), "]"),
                  "{dtype: float32|int64, shape: [\"batch\", sizes or dimension names ...]}", &t);
      (side == 0 ? spec.inputs : spec.outputs).push_back({t["name"].get<std::string>(), dtype.get<std::string>()});
    }
  }
  if (g.contains("profiles") && g["profiles"].is_array())
    for (const json& p : g["profiles"])
      if (is_int(p)) spec.profiles.push_back(p.get<int64_t>());
  return spec;
}

}  // namespace

Manifest read_manifest(const std::string& directory) {
  Manifest m;
  m.directory = directory;
  std::error_code ec;
  if (!fs::is_directory(directory, ec)) fail(ErrorCode::IO, "engine bundle ", directory, ": no such directory");
  const fs::path path = fs::path(directory) / kManifest;
  if (!fs::is_regular_file(path, ec))
    fail(ErrorCode::Format, "engine bundle ", directory, " has no ", kManifest, "; build one with clinvla-build-engine");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorCode::IO, "engine bundle ", directory, ": cannot read ", kManifest);
  std::stringstream buf;
  buf << in.rdbuf();
  json j;
  try {
    j = json::parse(buf.str());
  } catch (const json::exception& e) {
    bundle_error(m, cat(kManifest, " is not valid UTF-8 JSON (", std::string(e.what()).substr(0, 160), "); ", kRebuild));
  }
  if (!j.is_object() || j.value("format", json()) != "clinvla-engine-bundle")
    fail(ErrorCode::Format, "engine bundle ", directory, ": ", kManifest,
         " is not a ClinVLA engine manifest (no \"format\": \"clinvla-engine-bundle\"); build one with "
         "clinvla-build-engine");
  const json version = j.value("format_version", json());
  if (!is_int(version)) bad_field(m, "format_version", "an integer", &version);
  if (version.get<int64_t>() > 2)
    fail(ErrorCode::Format, "engine bundle ", directory, " has format_version ", version.get<int64_t>(),
         ", newer than this libclinvla understands (2); upgrade clinvla-engine");
  if (version.get<int64_t>() < 2)
    fail(ErrorCode::Format, "engine bundle ", directory, " has format_version ", version.get<int64_t>(),
         ", written by an older clinvla-build-engine that did not list every file; rebuild the engine with --force");

  const json files = j.value("files", json());
  if (!files.is_object() || files.empty())
    bad_field(m, "files", "a non-empty object of file name -> {bytes, sha256}", &files);
  static const std::regex sha_re("^[0-9a-f]{64}$");
  for (auto it = files.begin(); it != files.end(); ++it) {
    if (!safe_relative_name(it.key()))
      bundle_error(m, cat(kManifest, " lists the file '", it.key(), "', which is not a plain relative path inside the "
                          "bundle; the manifest was edited: rebuild the engine"));
    const json& e = it.value();
    if (!e.is_object() || !is_int(e.value("bytes", json())) || e["bytes"].get<int64_t>() < 0 ||
        !e.value("sha256", json()).is_string() || !std::regex_match(e["sha256"].get<std::string>(), sha_re))
      bad_field(m, cat("files['", it.key(), "']"), "{\"bytes\": a size >= 0, \"sha256\": 64 lowercase hex digits}", &e);
    m.files[it.key()] = {e["bytes"].get<int64_t>(), e["sha256"].get<std::string>()};
  }

  struct Rules { std::vector<std::string> devices, precisions; std::string suffix; };
  static const std::map<std::string, Rules> kRules = {
      {"onnxruntime", {{"cpu", "cuda"}, {"fp32", "fp16"}, ".onnx"}},
      {"aoti", {{"cpu", "cuda"}, {"fp32", "fp16", "bf16"}, ".pt2"}},
      {"tensorrt", {{"cuda"}, {"fp32", "fp16", "bf16", "fp8"}, ".plan"}},
      {"compile", {{"cpu", "cuda"}, {"fp32", "fp16", "bf16"}, ".safetensors"}},
      {"openvino", {{"cpu"}, {"fp32", "bf16", "int8"}, ".xml"}},
  };
  const json backend = j.value("backend", json());
  if (!backend.is_string() || !kRules.count(backend.get<std::string>()))
    bad_field(m, "backend", "one of onnxruntime, aoti, tensorrt, compile, openvino", &backend);
  m.backend = backend.get<std::string>();
  const Rules& rules = kRules.at(m.backend);
  const json device = j.value("device", json()), precision = j.value("precision", json());
  auto in_list = [](const json& v, const std::vector<std::string>& l) {
    return v.is_string() && std::find(l.begin(), l.end(), v.get<std::string>()) != l.end();
  };
  if (!in_list(device, rules.devices)) bad_field(m, "device", cat("a device this ", m.backend, " bundle supports"), &device);
  if (!in_list(precision, rules.precisions))
    bad_field(m, "precision", cat("a precision of a ", m.backend, " bundle"), &precision);
  m.device = device.get<std::string>();
  m.precision = precision.get<std::string>();

  const json sizes = j.value("batch_sizes", json());
  bool sizes_ok = sizes.is_array() && !sizes.empty();
  for (size_t i = 0; sizes_ok && i < sizes.size(); ++i) {
    sizes_ok = is_int(sizes[i]) && sizes[i].get<int64_t>() >= 1 && sizes[i].get<int64_t>() <= 65536 &&
               (i == 0 || sizes[i].get<int64_t>() > sizes[i - 1].get<int64_t>());
    if (sizes_ok) m.batch_sizes.push_back(sizes[i].get<int64_t>());
  }
  if (!sizes_ok) bad_field(m, "batch_sizes", "a non-empty increasing list of distinct integers in 1..65536", &sizes);
  const json tokens = j.value("max_text_len", json());
  if (!(is_int(tokens) && tokens.get<int64_t>() >= 3 && tokens.get<int64_t>() <= 65536))
    bad_field(m, "max_text_len", "an integer in 3..65536", &tokens);
  m.max_text_len = tokens.get<int64_t>();

  const json cfg = j.value("config", json());
  const json vision = cfg.is_object() ? cfg.value("vision", json()) : json();
  if (!vision.is_object()) bad_field(m, "config.vision", "an object (the model config)", &vision);
  for (const char* key : {"image_size", "patch_size"}) {
    const json v = vision.value(key, json());
    if (!(is_int(v) && v.get<int64_t>() >= 1)) bad_field(m, cat("config.vision.", key), "a positive integer", &v);
  }
  m.image_size = vision["image_size"].get<int64_t>();
  m.patch_size = vision["patch_size"].get<int64_t>();
  const json views = vision.value("num_views", json());
  if (!(is_int(views) && (views.get<int64_t>() == 1 || views.get<int64_t>() == 2)))
    bad_field(m, "config.vision.num_views", "1 or 2", &views);
  m.num_views = views.get<int64_t>();
  const json mean = vision.value("pixel_mean", json()), std_ = vision.value("pixel_std", json());
  if (!mean.is_number()) bad_field(m, "config.vision.pixel_mean", "a number", &mean);
  if (!(std_.is_number() && std_.get<double>() > 0)) bad_field(m, "config.vision.pixel_std", "a positive number", &std_);
  m.pixel_mean = mean.get<double>();
  m.pixel_std = std_.get<double>();
  const json dim = cfg.value("embed_dim", json());
  if (!(is_int(dim) && dim.get<int64_t>() >= 1)) bad_field(m, "config.embed_dim", "a positive integer", &dim);
  m.embed_dim = dim.get<int64_t>();

  const json tok = j.value("tokenizer", json());
  const json vocab = tok.is_object() ? tok.value("vocab", json()) : json();
  if (!(vocab.is_string() && m.files.count(vocab.get<std::string>())))
    bad_field(m, "tokenizer.vocab", "the name of a listed file (the vocabulary)", &vocab);
  m.vocab = vocab.get<std::string>();
  const json lower = tok.value("lowercase", json(true)), maxlen = tok.value("max_length", json(m.max_text_len));
  if (!lower.is_boolean() || !(is_int(maxlen) && maxlen.get<int64_t>() >= 3))
    bad_field(m, "tokenizer", "{lowercase: true/false, max_length: an integer >= 3}", &tok);
  m.lowercase = lower.get<bool>();
  m.tokenizer_max_length = maxlen.get<int64_t>();

  const json graphs = j.value("graphs", json());
  if (!(graphs.is_object() && graphs.size() == 2 && graphs.contains("image") && graphs.contains("text")))
    bad_field(m, "graphs", "an object with exactly the graphs \"image\" and \"text\"", &graphs);
  const std::vector<std::string> image_in =
      m.num_views == 2 ? std::vector<std::string>{"frontal", "lateral", "lateral_present"}
                       : std::vector<std::string>{"frontal"};
  m.image = read_graph(m, graphs, "image", rules.suffix, image_in, {"image_emb", "regions"});
  m.text = read_graph(m, graphs, "text", rules.suffix, {"input_ids", "attention_mask"}, {"text_emb", "words"});

  const json versions = j.value("versions", json::object());
  if (versions.is_object())
    for (auto it = versions.begin(); it != versions.end(); ++it)
      if (it.value().is_string()) m.versions[it.key()] = it.value().get<std::string>();

  if (directory.find(".building-") != std::string::npos)
    bundle_error(m, "is not a finished bundle: it is in the working folder of a clinvla-build-engine run that did "
                    "not finish (killed or failed); delete it and build again");
  if (j.value("complete", json()) != json(true))
    fail(ErrorCode::Format, "engine bundle ", directory, " is incomplete: the build that wrote it did not finish "
         "(killed, or failed after moving it into place). Rebuild it with clinvla-build-engine --force");
  return m;
}

void check_versions(const Manifest& m, const BuildVersions& here) {
  std::vector<std::pair<std::string, std::string>> deps = {{"clinvla_engine", here.clinvla_engine}};
  if (m.backend == "aoti") deps.push_back({"torch", here.torch});
  for (const auto& [name, have] : deps) {
    auto it = m.versions.find(name);
    if (it == m.versions.end())
      bundle_error(m, cat("manifest.json does not record the ", name, " version it was built with"));
    if (it->second != have)
      fail(ErrorCode::Format, "engine bundle ", m.directory, " was built with ", name, " ", it->second,
           " but libclinvla was built against ", name, " ", have, "; rebuild the engine with clinvla-build-engine "
           "where ", name, " ", have, " is installed (or rebuild libclinvla against ", name, " ", it->second, ")");
  }
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorCode::IO, "cannot open ", path, " to hash it");
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    fail(ErrorCode::Internal, "OpenSSL could not start a SHA-256 digest");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    const std::streamsize got = in.gcount();
    if (got > 0 && EVP_DigestUpdate(ctx.get(), buf.data(), size_t(got)) != 1)
      fail(ErrorCode::Internal, "OpenSSL SHA-256 update failed");
  }
  if (in.bad()) fail(ErrorCode::IO, "error while reading ", path);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest, &len) != 1) fail(ErrorCode::Internal, "OpenSSL SHA-256 final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

void verify_files(const Manifest& m, bool hash) {
  // Every entry under the folder (symbolic links are not followed), as Path.rglob sees it.
  std::set<std::string> present, odd;
  const fs::path root(m.directory);
  std::error_code ec;
  for (fs::recursive_directory_iterator it(root, fs::directory_options::none, ec), end; it != end; it.increment(ec)) {
    if (ec) fail(ErrorCode::IO, "engine bundle ", m.directory, ": cannot list its files: ", ec.message());
    const fs::path& p = it->path();
    const std::string rel = p.lexically_relative(root).generic_string();
    const fs::file_status st = it->symlink_status();
    if (fs::is_symlink(st) || !(fs::is_directory(st) || fs::is_regular_file(st)))
      odd.insert(rel);
    else if (fs::is_regular_file(st) && rel != kManifest)
      present.insert(rel);
  }
  if (ec) fail(ErrorCode::IO, "engine bundle ", m.directory, ": cannot list its files: ", ec.message());
  std::set<std::string> names(present.begin(), present.end());
  names.insert(odd.begin(), odd.end());
  for (const auto& kv : m.files) names.insert(kv.first);
  for (const std::string& name : names) {
    const char* why = nullptr;
    auto listed = m.files.find(name);
    if (odd.count(name)) {
      why = "is a link or special file; a bundle holds plain files only";
    } else if (listed == m.files.end()) {
      why = "is not listed in manifest.json (added after the build, or its entry was removed)";
    } else if (!present.count(name)) {
      why = "is listed in manifest.json but missing";
    } else {
      const std::string path = (root / name).string();
      const auto size = fs::file_size(path, ec);
      if (ec || int64_t(size) != listed->second.first || (hash && sha256_file(path) != listed->second.second))
        why = "does not match its size and SHA-256 in manifest.json (changed or truncated after the build)";
    }
    if (why) {
      const char* hint = name.find(".tmp-") != std::string::npos ? " (left by an interrupted write)" : "";
      fail(ErrorCode::Format, "engine bundle ", m.directory, ": ", name, " ", why, hint, "; ", kRebuild,
           " (or restore the bundle as it was built)");
    }
  }
}

// ---- report_text ---------------------------------------------------------------------------------
namespace {

// UTF-8 -> code points; invalid bytes map to U+FFFD, as a str decoded with errors="replace" would.
std::vector<char32_t> decode_utf8(const std::string& s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = s[i];
    const int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    bool ok = n >= 0 && i + size_t(n) < s.size();
    char32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; ok && k <= n; ++k) {
      const unsigned char cc = s[i + size_t(k)];
      ok = (cc >> 6) == 2;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) {
      out.push_back(0xFFFD);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += size_t(n) + 1;
  }
  return out;
}

void encode_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// str.isspace() / re's \s on str: Unicode White_Space plus the ASCII separators 0x1c-0x1f.
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// re's \w on str: alphanumerics and the underscore. ASCII exactly; beyond ASCII glibc's Unicode
// tables (C.UTF-8) stand in for Python's, which agree on letters and digits of every script.
bool is_word(char32_t c) {
  if (c < 0x80) return std::isalnum(int(c)) || c == '_';
  static locale_t loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", locale_t(0));
  return loc ? iswalnum_l(wint_t(c), loc) != 0 : true;
}

bool in_header_class(char32_t c) { return (c >= 'A' && c <= 'Z') || c == ' ' || c == '/' || c == '&' || c == '-'; }

}  // namespace

std::string report_text(const std::string& utf8) {
  // re.sub(r"\b[A-Z][A-Z /&-]{2,}:\s*", " ", text), then " ".join(text.split())
  const std::vector<char32_t> s = decode_utf8(utf8);
  std::vector<char32_t> replaced;
  replaced.reserve(s.size());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    if (s[i] >= 'A' && s[i] <= 'Z' && (i == 0 || !is_word(s[i - 1]))) {
      size_t j = i + 1;
      while (j < n && in_header_class(s[j])) ++j;
      // the class cannot match ':', so giving characters back never finds another ':'
      if (j - i - 1 >= 2 && j < n && s[j] == ':') {
        ++j;
        while (j < n && is_space(s[j])) ++j;
        replaced.push_back(' ');
        i = j;
        continue;
      }
    }
    replaced.push_back(s[i]);
    ++i;
  }
  std::string out;
  bool pending = false;
  for (char32_t c : replaced) {
    if (is_space(c)) {
      pending = !out.empty();
      continue;
    }
    if (pending) out += ' ';
    pending = false;
    encode_utf8(c, out);
  }
  return out;
}

SpecialIds vocab_special_ids(const std::string& vocab_path) {
  std::ifstream in(vocab_path, std::ios::binary);
  if (!in) fail(ErrorCode::IO, "cannot read the tokenizer vocabulary ", vocab_path);
  std::stringstream buf;
  buf << in.rdbuf();
  const std::vector<char32_t> s = decode_utf8(buf.str());
  // str.splitlines() boundaries: \n \r \r\n \v \f \x1c \x1d \x1e \x85 \u2028 \u2029
  auto is_break = [](char32_t c) {
    return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D || c == 0x1E || c == 0x85 ||
           c == 0x2028 || c == 0x2029;
  };
  SpecialIds ids;
  std::string line;
  auto flush = [&] {
    if (line.empty()) return;
    const int64_t id = ids.size++;
    // a repeated token keeps its last line, as Python's {token: index} dict does
    if (line == "[PAD]") ids.pad = id;
    if (line == "[SEP]") ids.sep = id;
    if (line == "[CLS]") ids.cls = id;
    if (line == "[UNK]") ids.unk = id;
    line.clear();
  };
  for (size_t i = 0; i < s.size(); ++i) {
    if (is_break(s[i])) {
      flush();
      if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
    } else {
      encode_utf8(s[i], line);
    }
  }
  flush();
  for (auto [name, id] : {std::pair<const char*, int64_t>{"[CLS]", ids.cls}, {"[SEP]", ids.sep}, {"[PAD]", ids.pad},
                          {"[UNK]", ids.unk}})
    if (id < 0) fail(ErrorCode::Format, "tokenizer vocabulary ", vocab_path, " has no ", name, " token");
  return ids;
}

}  // namespace detail
}  // namespace clinvla
