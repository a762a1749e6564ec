// The frontal / lateral view rules, read at run time from clinvla_engine/data/view_rules.json (the
// file Python's clinvla_engine.data.views reads), applied exactly as views.classify does; the
// shared cases in tests/data/view_rule_vectors.json check both sides.
#include <dlfcn.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <utility>
#include <vector>

#include "clinvla/dicom.hpp"
#include "internal.hpp"  // csrc/core: detail::cat, detail::fail

namespace clinvla {

struct ViewRules::Impl {
  std::vector<std::string> as_space;
  std::set<std::string> modalities;
  std::vector<std::string> order;
  std::map<std::string, std::pair<View, std::string>> position;  // normalised value -> (view, label)
  std::set<std::string> excluded;
  std::map<std::pair<std::string, std::string>, std::pair<View, std::string>> codes;  // (scheme, CODE)
  std::map<std::string, std::pair<View, std::string>> meanings;
  std::set<std::string> frontal_rows, lateral_rows;
};

namespace {

using detail::cat;
using detail::fail;

View view_of(const std::string& name, const std::string& path) {
  if (name == "frontal") return View::Frontal;
  if (name == "lateral") return View::Lateral;
  fail(ErrorCode::Format, path, ": unknown view '", name, "' (expected frontal or lateral)");
}

// Python's str.split() whitespace, as UTF-8 byte sequences: ASCII \t\n\v\f\r, \x1c-\x1f, space,
// and U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
std::size_t whitespace_len(const std::string& s, std::size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
  auto at = [&](std::size_t k) -> unsigned { return k < s.size() ? static_cast<unsigned char>(s[k]) : 0u; };
  if (c == 0xC2 && (at(i + 1) == 0x85 || at(i + 1) == 0xA0)) return 2;
  if (c == 0xE1 && at(i + 1) == 0x9A && at(i + 2) == 0x80) return 3;
  if (c == 0xE2 && at(i + 1) == 0x80) {
    const unsigned d = at(i + 2);
    if ((d >= 0x80 && d <= 0x8A) || d == 0xA8 || d == 0xA9 || d == 0xAF) return 3;
  }
  if (c == 0xE2 && at(i + 1) == 0x81 && at(i + 2) == 0x9F) return 3;
  if (c == 0xE3 && at(i + 1) == 0x80 && at(i + 2) == 0x80) return 3;
  return 0;
}

// Python's str.upper() for ASCII, plus the non-ASCII letters whose upper case is ASCII (dotless i,
// long s, the Latin ligatures): no other upper-cased character can equal a rule's ASCII entry.
std::string upper(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out += (c >= 'a' && c <= 'z') ? char(c - 32) : char(c);
      continue;
    }
    const unsigned c1 = i + 1 < s.size() ? static_cast<unsigned char>(s[i + 1]) : 0u;
    const unsigned c2 = i + 2 < s.size() ? static_cast<unsigned char>(s[i + 2]) : 0u;
    if (c == 0xC4 && c1 == 0xB1) { out += 'I'; ++i; continue; }   // U+0131 dotless i
    if (c == 0xC5 && c1 == 0xBF) { out += 'S'; ++i; continue; }   // U+017F long s
    if (c == 0xEF && c1 == 0xAC && c2 >= 0x80 && c2 <= 0x86) {    // U+FB00..U+FB06 ligatures
      static const char* kLig[] = {"FF", "FI", "FL", "FFI", "FFL", "ST", "ST"};
      out += kLig[c2 - 0x80];
      i += 2;
      continue;
    }
    out += char(c);
  }
  return out;
}

// Python's str.strip() of whitespace (for CodeValue).
std::string strip(const std::string& s) {
  std::size_t a = 0;
  while (a < s.size()) {
    const std::size_t n = whitespace_len(s, a);
    if (!n) break;
    a += n;
  }
  std::size_t b = s.size();
  while (b > a) {
    // find the last whitespace sequence ending at b
    std::size_t n = 0;
    for (std::size_t k = 1; k <= 3 && k <= b - a; ++k) {
      if (whitespace_len(s, b - k) == k) { n = k; break; }
    }
    if (!n) break;
    b -= n;
  }
  return s.substr(a, b - a);
}

std::vector<std::string> string_list(const nlohmann::json& j, const std::string& where, const std::string& path) {
  if (!j.is_array()) fail(ErrorCode::Format, path, ": ", where, " must be a list of strings");
  std::vector<std::string> out;
  for (const auto& v : j) {
    if (!v.is_string()) fail(ErrorCode::Format, path, ": ", where, " must be a list of strings");
    out.push_back(v.get<std::string>());
  }
  return out;
}

bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string library_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&library_dir), &info) && info.dli_fname) {
    std::string f = info.dli_fname;
    const std::size_t slash = f.rfind('/');
    return slash == std::string::npos ? "." : f.substr(0, slash);
  }
  return "";
}

}  // namespace

const char* view_name(View view) {
  switch (view) {
    case View::Frontal: return "frontal";
    case View::Lateral: return "lateral";
    default: return "none";
  }
}

ViewRules ViewRules::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorCode::IO, path, ": cannot open the view rules file (", std::strerror(errno), ")");
  nlohmann::json raw;
  try {
    raw = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::Format, path, ": the view rules file is not valid JSON (", e.what(), ")");
  }
  auto impl = std::make_shared<Impl>();
  try {
    if (raw.at("schema_version").get<int>() != 1) {
      fail(ErrorCode::Format, path, ": view rules schema_version ", raw.at("schema_version").dump(),
           " is not supported (this library reads version 1); use the view_rules.json of the same release");
    }
    impl->as_space = string_list(raw.at("normalise").at("as_space"), "normalise.as_space", path);
    for (const auto& m : string_list(raw.at("modalities").at("allowed"), "modalities.allowed", path)) impl->modalities.insert(m);
    impl->order = string_list(raw.at("rule_order"), "rule_order", path);
    for (const auto& name : impl->order) {
      if (name != "view_position" && name != "view_code" && name != "patient_orientation") {
        fail(ErrorCode::Format, path, ": unknown rule '", name, "' in rule_order");
      }
    }
    const auto& vp = raw.at("view_position");
    for (const char* view : {"frontal", "lateral"}) {
      for (const auto& [value, label] : vp.at(view).items()) {
        impl->position[value] = {view_of(view, path), label.get<std::string>()};
      }
    }
    for (const auto& e : string_list(vp.at("excluded"), "view_position.excluded", path)) impl->excluded.insert(e);
    const auto& vc = raw.at("view_code");
    for (const auto& entry : vc.at("codes")) {
      std::string code = upper(entry.at("code").get<std::string>());
      const View view = view_of(entry.at("view").get<std::string>(), path);
      const std::string label = entry.at("label").get<std::string>();
      for (const auto& scheme : string_list(entry.at("schemes"), "view_code.codes[].schemes", path)) {
        impl->codes[{scheme, code}] = {view, label};
      }
    }
    for (const char* view : {"frontal", "lateral"}) {
      for (const auto& [meaning, label] : vc.at("meanings").at(view).items()) {
        impl->meanings[meaning] = {view_of(view, path), label.get<std::string>()};
      }
    }
    const auto& po = raw.at("patient_orientation");
    for (const auto& r : string_list(po.at("frontal_rows"), "patient_orientation.frontal_rows", path)) impl->frontal_rows.insert(r);
    for (const auto& r : string_list(po.at("lateral_rows"), "patient_orientation.lateral_rows", path)) impl->lateral_rows.insert(r);
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::Format, path, ": the view rules file lacks an entry or has one of the wrong type (", e.what(),
         "); use the view_rules.json of the same release");
  }
  ViewRules rules;
  rules.path_ = path;
  rules.impl_ = std::move(impl);
  return rules;
}

std::string ViewRules::default_path() {
  std::vector<std::string> tried;
  if (const char* env = std::getenv("CLINVLA_VIEW_RULES"); env && *env) {
    if (is_file(env)) return env;
    tried.push_back(std::string(env) + " ($CLINVLA_VIEW_RULES)");
  }
#ifdef CLINVLA_DEFAULT_VIEW_RULES
  if (is_file(CLINVLA_DEFAULT_VIEW_RULES)) return CLINVLA_DEFAULT_VIEW_RULES;
  tried.push_back(CLINVLA_DEFAULT_VIEW_RULES);
#endif
  const std::string dir = library_dir();
  if (!dir.empty()) {
    for (const char* rel : {"/../share/clinvla/view_rules.json", "/view_rules.json"}) {
      const std::string p = dir + rel;
      if (is_file(p)) return p;
      tried.push_back(p);
    }
  }
  std::string list;
  for (const auto& t : tried) list += (list.empty() ? "" : ", ") + t;
  fail(ErrorCode::Invalid, "no installed view_rules.json found (tried: ", list,
       "); pass its path, or set CLINVLA_VIEW_RULES to clinvla_engine/data/view_rules.json");
}

ViewRules ViewRules::load_default() { return load(default_path()); }

std::string ViewRules::normalise(const std::string& value) const {
  std::string text = upper(value);
  for (const std::string& token : impl_->as_space) {
    if (token.empty()) continue;
    std::size_t at = 0;
    while ((at = text.find(token, at)) != std::string::npos) {
      text.replace(at, token.size(), " ");
      at += 1;
    }
  }
  std::string out;
  std::size_t i = 0;
  bool pending_space = false;
  while (i < text.size()) {
    const std::size_t n = whitespace_len(text, i);
    if (n) {
      pending_space = !out.empty();
      i += n;
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += text[i++];
  }
  return out;
}

ViewDecision ViewRules::classify(const ViewTags& tags) const {
  if (!impl_) fail(ErrorCode::Invalid, "view rules not loaded");
  const Impl& r = *impl_;
  if (!r.modalities.count(normalise(tags.modality))) return {View::None, "modality", ""};
  for (const std::string& rule : r.order) {
    if (rule == "view_position") {
      const std::string value = normalise(tags.view_position);
      if (value.empty()) continue;
      if (auto it = r.position.find(value); it != r.position.end()) {
        return {it->second.first, "view_position", it->second.second};
      }
      if (r.excluded.count(value)) return {View::None, "view_position", ""};
    } else if (rule == "view_code") {
      const std::string scheme = normalise(tags.view_code_scheme);
      const std::string code = upper(strip(tags.view_code_value));
      auto it = r.codes.find({scheme, code});
      if (it != r.codes.end()) return {it->second.first, "view_code", it->second.second};
      auto m = r.meanings.find(normalise(tags.view_code_meaning));
      if (m != r.meanings.end()) return {m->second.first, "view_code", m->second.second};
    } else {  // patient_orientation: exactly two values, the first is the row direction
      const std::string& po = tags.patient_orientation;
      const std::size_t sep = po.find('\\');
      if (sep == std::string::npos || po.find('\\', sep + 1) != std::string::npos) continue;
      const std::string row = normalise(po.substr(0, sep));
      if (r.frontal_rows.count(row)) return {View::Frontal, "patient_orientation", "FRONTAL"};
      if (r.lateral_rows.count(row)) return {View::Lateral, "patient_orientation", "LATERAL"};
    }
  }
  return {View::None, "none", ""};
}

}  // namespace clinvla
