// DICOM Part 10 reading (uncompressed transfer syntaxes) and stored value -> display grey, equal to
// clinvla_engine.data.io.load_image (pydicom's pixel_array, apply_modality_lut, apply_voi_lut and
// apply_windowing, then dicom_to_unit's normalisation).
//
// Every length read from a file is checked against the bytes that remain before it is used, and
// the image size is checked from the header before any pixel buffer is allocated, so a corrupt or
// hostile file costs at most its own size (a deflated one at most kMaxInflatedBytes).
//
// The display conversion is elementwise, so for stored values of at most 16 bits it is computed
// once per possible stored word (a 256- or 65536-entry table) and then looked up per pixel; NaN
// in the table marks a stored value whose conversion fails (e.g. an index past the end of a LUT),
// which is an error only if a pixel actually holds it, as in pydicom.
#include "clinvla/dicom.hpp"
#include "internal.hpp"  // csrc/core: detail::cat, detail::fail

#ifndef CLINVLA_DICOM_NO_ZLIB  // built without zlib: deflated files are CLINVLA_ERR_UNSUPPORTED
#include <zlib.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace clinvla {
namespace {

using detail::cat;
using detail::fail;

constexpr uint32_t tag_of(uint16_t group, uint16_t element) { return (uint32_t(group) << 16) | element; }

constexpr uint32_t kTransferSyntax = tag_of(0x0002, 0x0010);
constexpr uint32_t kModality = tag_of(0x0008, 0x0060);
constexpr uint32_t kViewPosition = tag_of(0x0018, 0x5101);
constexpr uint32_t kStudyUid = tag_of(0x0020, 0x000D);
constexpr uint32_t kSeriesUid = tag_of(0x0020, 0x000E);
constexpr uint32_t kSopUid = tag_of(0x0008, 0x0018);
constexpr uint32_t kPatientOrientation = tag_of(0x0020, 0x0020);
constexpr uint32_t kViewCodeSequence = tag_of(0x0054, 0x0220);
constexpr uint32_t kCodeValue = tag_of(0x0008, 0x0100);
constexpr uint32_t kCodingScheme = tag_of(0x0008, 0x0102);
constexpr uint32_t kCodeMeaning = tag_of(0x0008, 0x0104);
constexpr uint32_t kSamplesPerPixel = tag_of(0x0028, 0x0002);
constexpr uint32_t kPhotometric = tag_of(0x0028, 0x0004);
constexpr uint32_t kNumberOfFrames = tag_of(0x0028, 0x0008);
constexpr uint32_t kRows = tag_of(0x0028, 0x0010);
constexpr uint32_t kColumns = tag_of(0x0028, 0x0011);
constexpr uint32_t kBitsAllocated = tag_of(0x0028, 0x0100);
constexpr uint32_t kBitsStored = tag_of(0x0028, 0x0101);
constexpr uint32_t kHighBit = tag_of(0x0028, 0x0102);
constexpr uint32_t kPixelRepresentation = tag_of(0x0028, 0x0103);
constexpr uint32_t kWindowCenter = tag_of(0x0028, 0x1050);
constexpr uint32_t kWindowWidth = tag_of(0x0028, 0x1051);
constexpr uint32_t kRescaleIntercept = tag_of(0x0028, 0x1052);
constexpr uint32_t kRescaleSlope = tag_of(0x0028, 0x1053);
constexpr uint32_t kVoiLutFunction = tag_of(0x0028, 0x1056);
constexpr uint32_t kModalityLutSequence = tag_of(0x0028, 0x3000);
constexpr uint32_t kLutDescriptor = tag_of(0x0028, 0x3002);
constexpr uint32_t kLutData = tag_of(0x0028, 0x3006);
constexpr uint32_t kVoiLutSequence = tag_of(0x0028, 0x3010);
constexpr uint32_t kPixelData = tag_of(0x7FE0, 0x0010);
constexpr uint32_t kItem = tag_of(0xFFFE, 0xE000);
constexpr uint32_t kItemEnd = tag_of(0xFFFE, 0xE00D);
constexpr uint32_t kSequenceEnd = tag_of(0xFFFE, 0xE0DD);
constexpr uint32_t kUndefined = 0xFFFFFFFFu;
constexpr int kMaxDepth = 32;
// A deflated data set may inflate to at most this (the largest image Python decodes, at 4 bytes a
// pixel, plus room for the header): a "zip bomb" stops here.
constexpr std::size_t kMaxInflatedBytes = std::size_t(kMaxImagePixels) * 4 + (64u << 20);

std::string hex_tag(uint32_t tag) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "(%04X,%04X)", tag >> 16, tag & 0xFFFF);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Transfer syntaxes
// ---------------------------------------------------------------------------------------------
struct Syntax {
  bool known = false, explicit_vr = true, little_endian = true, deflated = false, compressed = false;
  std::string name;
};

Syntax syntax_of(const std::string& uid) {
  Syntax s;
  s.known = true;
  if (uid == "1.2.840.10008.1.2") { s.explicit_vr = false; s.name = "Implicit VR Little Endian"; return s; }
  if (uid == "1.2.840.10008.1.2.1") { s.name = "Explicit VR Little Endian"; return s; }
  if (uid == "1.2.840.10008.1.2.1.99") { s.deflated = true; s.name = "Deflated Explicit VR Little Endian"; return s; }
  if (uid == "1.2.840.10008.1.2.2") { s.little_endian = false; s.name = "Explicit VR Big Endian"; return s; }
  static const std::pair<const char*, const char*> kCompressed[] = {
      {"1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"},
      {"1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 and 4)"},
      {"1.2.840.10008.1.2.4.57", "JPEG Lossless (Process 14)"},
      {"1.2.840.10008.1.2.4.70", "JPEG Lossless (Process 14, Selection Value 1)"},
      {"1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"},
      {"1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"},
      {"1.2.840.10008.1.2.4.90", "JPEG 2000 (Lossless Only)"},
      {"1.2.840.10008.1.2.4.91", "JPEG 2000"},
      {"1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Multi-component (Lossless Only)"},
      {"1.2.840.10008.1.2.4.93", "JPEG 2000 Part 2 Multi-component"},
      {"1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000 (Lossless Only)"},
      {"1.2.840.10008.1.2.4.202", "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)"},
      {"1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000"},
      {"1.2.840.10008.1.2.5", "RLE Lossless"},
      {"1.2.840.10008.1.2.8.1", "JPEG XL Lossless"},
      {"1.2.840.10008.1.2.8.2", "JPEG XL JPEG Recompression"},
      {"1.2.840.10008.1.2.8.3", "JPEG XL"},
  };
  for (const auto& c : kCompressed) {
    if (uid == c.first) { s.compressed = true; s.name = c.second; return s; }
  }
  if (uid.rfind("1.2.840.10008.1.2.4.", 0) == 0 || uid.rfind("1.2.840.10008.1.2.8.", 0) == 0) {
    s.compressed = true;  // other JPEG-family / MPEG / JPEG XL syntaxes
    s.name = "compressed";
    return s;
  }
  s.known = false;
  s.name = "unknown";
  return s;
}

// ---------------------------------------------------------------------------------------------
// Data set parsing
// ---------------------------------------------------------------------------------------------
struct Dataset;

struct Element {
  char vr[3] = {0, 0, 0};  // "" in implicit VR for tags the dictionary below does not name
  const uint8_t* value = nullptr;
  uint32_t length = 0;
  bool undefined_length = false;
  bool is_sequence = false;
  bool implicit = false;
  std::vector<Dataset> items;
};

struct Dataset {
  std::map<uint32_t, Element> elements;
  const Element* find(uint32_t tag) const {
    auto it = elements.find(tag);
    return it == elements.end() ? nullptr : &it->second;
  }
};

bool long_length_vr(const char* vr) {
  static const char* kLong[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"};
  for (const char* v : kLong)
    if (vr[0] == v[0] && vr[1] == v[1]) return true;
  return false;
}

// The VR of the tags read as numbers or sequences, for implicit VR files.
const char* implicit_vr(uint32_t tag) {
  switch (tag) {
    case kSamplesPerPixel: case kRows: case kColumns: case kBitsAllocated: case kBitsStored: case kHighBit:
    case kPixelRepresentation: case kLutDescriptor:
      return "US";
    case kLutData: case kPixelData:
      return "OW";
    case kViewCodeSequence: case kModalityLutSequence: case kVoiLutSequence:
      return "SQ";
    default:
      return "";
  }
}

class Parser {
 public:
  Parser(const uint8_t* data, std::size_t size, const std::string& name, bool explicit_vr, bool little_endian)
      : base_(data), size_(size), name_(name), explicit_(explicit_vr), little_(little_endian) {}

  Dataset parse(std::size_t begin, std::size_t end) {
    pos_ = begin;
    return parse_dataset(end, false, 0, explicit_);
  }

 private:
  [[noreturn]] void corrupt(const std::string& what) const {
    fail(ErrorCode::Format, name_, ": corrupt or truncated DICOM file (", what, " at byte ", pos_,
         " of ", size_, "); the file may be cut short: copy it again from the PACS");
  }
  void need(std::size_t n, std::size_t end) const {
    if (pos_ > end || end - pos_ < n) corrupt(cat(n, " more bytes needed"));
  }
  uint16_t u16() {
    const uint8_t* p = base_ + pos_;
    pos_ += 2;
    return little_ ? uint16_t(p[0] | (p[1] << 8)) : uint16_t((p[0] << 8) | p[1]);
  }
  uint32_t u32() {
    const uint8_t* p = base_ + pos_;
    pos_ += 4;
    return little_ ? (uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24))
                   : ((uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]));
  }
  uint32_t read_tag(std::size_t end) {
    need(4, end);
    const uint16_t g = u16();
    const uint16_t e = u16();
    return tag_of(g, e);
  }

  // Elements until `end` (defined length) or an item delimiter (undefined-length item).
  Dataset parse_dataset(std::size_t end, bool undefined_item, int depth, bool explicit_vr) {
    if (depth > kMaxDepth) corrupt(cat("sequences nested deeper than ", kMaxDepth));
    Dataset ds;
    const bool top = depth == 0 && !undefined_item;
    while (pos_ < end) {
      if (top && end - pos_ < 8) break;  // trailing bytes shorter than an element: ignored, as pydicom does
      const uint32_t tag = read_tag(end);
      if (tag == kItemEnd) {
        need(4, end);
        u32();
        if (!undefined_item) corrupt("item delimiter outside an item");
        return ds;
      }
      if ((tag >> 16) == 0xFFFE) corrupt(cat("unexpected delimiter ", hex_tag(tag)));
      Element el;
      bool explicit_here = explicit_vr;
      if (explicit_here) {
        need(2, end);
        const char a = char(base_[pos_]), b = char(base_[pos_ + 1]);
        if (a >= 'A' && a <= 'Z' && b >= 'A' && b <= 'Z') {
          el.vr[0] = a;
          el.vr[1] = b;
          pos_ += 2;
        } else {
          // An implicit VR element in an explicit VR data set: pydicom switches to implicit VR
          // for the rest of the data set; so does this reader.
          explicit_here = explicit_vr = false;
        }
      }
      if (explicit_here) {
        if (long_length_vr(el.vr)) {
          need(6, end);
          pos_ += 2;
          el.length = u32();
        } else {
          need(2, end);
          el.length = u16();
        }
      } else {
        need(4, end);
        el.length = u32();
        const char* vr = implicit_vr(tag);
        el.vr[0] = vr[0];
        el.vr[1] = vr[0] ? vr[1] : '\0';
        el.implicit = true;
      }
      el.undefined_length = el.length == kUndefined;
      const bool sq = (el.vr[0] == 'S' && el.vr[1] == 'Q') || (el.undefined_length && tag != kPixelData);
      if (sq) {
        el.is_sequence = true;
        // An undefined-length UN holds implicit VR little endian items (PS3.5 6.2.2).
        const bool inner_explicit = explicit_here && !(el.vr[0] == 'U' && el.vr[1] == 'N');
        parse_items(el, end, depth, inner_explicit);
      } else if (el.undefined_length) {
        // Encapsulated (compressed) pixel data: fragments up to the sequence delimiter.
        el.value = base_ + pos_;
        skip_fragments(end);
        el.length = uint32_t(std::min<std::size_t>(pos_ - (el.value - base_), 0xFFFFFFFEu));
      } else {
        if (el.length > end - pos_) {
          // pydicom gives the last element of a cut-short file the bytes that remain (the pixel
          // data length is checked against the image size later); anywhere else it is corrupt.
          if (!top) corrupt(cat("element ", hex_tag(tag), " claims ", el.length, " bytes but ", end - pos_, " remain"));
          el.length = uint32_t(end - pos_);
        }
        el.value = base_ + pos_;
        pos_ += el.length;
      }
      ds.elements[tag] = std::move(el);
    }
    if (undefined_item) corrupt("item without its delimiter");
    return ds;
  }

  void parse_items(Element& el, std::size_t end, int depth, bool explicit_vr) {
    std::size_t seq_end = end;
    if (!el.undefined_length) {
      if (el.length > end - pos_) corrupt(cat("sequence claims ", el.length, " bytes but ", end - pos_, " remain"));
      seq_end = pos_ + el.length;
    }
    while (true) {
      if (!el.undefined_length && pos_ >= seq_end) break;
      const uint32_t tag = read_tag(seq_end);
      need(4, seq_end);
      const uint32_t len = u32();
      if (tag == kSequenceEnd) {
        if (!el.undefined_length) corrupt("sequence delimiter in a defined-length sequence");
        return;
      }
      if (tag != kItem) corrupt(cat("expected a sequence item, found ", hex_tag(tag)));
      if (el.items.size() > 1'000'000) corrupt("too many sequence items");
      if (len == kUndefined) {
        el.items.push_back(parse_dataset(seq_end, true, depth + 1, explicit_vr));
      } else {
        if (len > seq_end - pos_) corrupt(cat("item claims ", len, " bytes but ", seq_end - pos_, " remain"));
        const std::size_t item_end = pos_ + len;
        el.items.push_back(parse_dataset(item_end, false, depth + 1, explicit_vr));
        pos_ = item_end;
      }
    }
    pos_ = seq_end;
  }

  void skip_fragments(std::size_t end) {
    while (true) {
      const uint32_t tag = read_tag(end);
      need(4, end);
      const uint32_t len = u32();
      if (tag == kSequenceEnd) return;
      if (tag != kItem || len == kUndefined) corrupt(cat("bad encapsulated pixel data fragment ", hex_tag(tag)));
      if (len > end - pos_) corrupt(cat("pixel data fragment claims ", len, " bytes but ", end - pos_, " remain"));
      pos_ += len;
    }
  }

  const uint8_t* base_;
  std::size_t size_;
  std::string name_;
  bool explicit_;
  bool little_;
  std::size_t pos_ = 0;
};

// Text value as pydicom gives it: trailing spaces and NULs removed (leading ones kept).
std::string text_of(const Element& el) {
  std::string s(reinterpret_cast<const char*>(el.value), el.length);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

bool is_vr(const Element& el, const char* vr) { return el.vr[0] == vr[0] && el.vr[1] == vr[1]; }

// Binary numbers (US, SS, UL, SL, OW) as int64 values; text numbers (IS, DS, ...) parsed.
std::vector<int64_t> ints_of(const Element& el, bool little, bool ss_override, const std::string& name,
                             const char* keyword) {
  std::vector<int64_t> out;
  const uint8_t* p = el.value;
  auto u16 = [&](std::size_t i) {
    return little ? uint16_t(p[2 * i] | (p[2 * i + 1] << 8)) : uint16_t((p[2 * i] << 8) | p[2 * i + 1]);
  };
  if ((is_vr(el, "US") || is_vr(el, "SS")) && el.length % 2) {
    fail(ErrorCode::Format, name, ": ", keyword, " has an odd length of ", el.length, " bytes (corrupt header)");
  }
  if ((is_vr(el, "UL") || is_vr(el, "SL")) && el.length % 4) {
    fail(ErrorCode::Format, name, ": ", keyword, " has a length of ", el.length, " bytes, not a multiple of 4 (corrupt header)");
  }
  if (is_vr(el, "US") || is_vr(el, "OW") || is_vr(el, "SS")) {
    const bool is_signed = is_vr(el, "SS") || ss_override;
    for (std::size_t i = 0; i < el.length / 2; ++i) {
      const uint16_t v = u16(i);
      out.push_back(is_signed ? int64_t(int16_t(v)) : int64_t(v));
    }
    return out;
  }
  if (is_vr(el, "UL") || is_vr(el, "SL")) {
    for (std::size_t i = 0; i < el.length / 4; ++i) {
      const uint32_t v = little ? (uint32_t(u16(2 * i)) | (uint32_t(u16(2 * i + 1)) << 16))
                                : ((uint32_t(u16(2 * i)) << 16) | uint32_t(u16(2 * i + 1)));
      out.push_back(is_vr(el, "SL") ? int64_t(int32_t(v)) : int64_t(v));
    }
    return out;
  }
  if (is_vr(el, "OB")) {
    for (std::size_t i = 0; i < el.length; ++i) out.push_back(p[i]);
    return out;
  }
  // a text VR (IS / DS): backslash-separated numbers
  const std::string s = text_of(el);
  std::size_t start = 0;
  while (start <= s.size()) {
    std::size_t stop = s.find('\\', start);
    if (stop == std::string::npos) stop = s.size();
    const std::string part = s.substr(start, stop - start);
    char* endp = nullptr;
    errno = 0;
    const long long v = std::strtoll(part.c_str(), &endp, 10);
    while (endp && *endp == ' ') ++endp;
    if (part.empty() || errno || !endp || *endp) {
      fail(ErrorCode::Format, name, ": invalid ", keyword, " value '", s, "' (expected integers)");
    }
    out.push_back(v);
    start = stop + 1;
  }
  return out;
}

std::string ints_as_text(const std::vector<int64_t>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += '\\';
    s += std::to_string(v[i]);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// The attributes the display conversion reads, with pydicom's distinctions: absent, present but
// empty (pydicom's None), or a value (text, multi-values backslash-separated).
// ---------------------------------------------------------------------------------------------
struct Attr {
  bool present = false;
  std::string value;
  bool has_value() const { return present && !value.empty(); }
};

struct LutItem {
  bool descriptor_present = false;
  std::vector<int64_t> descriptor;
  bool data_present = false;
  bool data_ow = false;  // OW: unpacked as descriptor[0] little-endian words, as pydicom does
  std::vector<int64_t> data;
};

struct LutSeq {
  bool present = false;
  std::vector<LutItem> items;
  bool truthy() const { return present && !items.empty(); }  // pydicom's `if ds.get(...)`
};

struct PixelAttrs {
  Attr photometric, samples, frames, rows, columns, bits_allocated, bits_stored, pixel_rep;
  Attr slope, intercept, window_center, window_width, voi_function, modality;
  LutSeq modality_lut, voi_lut;
  bool has_pixel_data = false;
};

// ---------------------------------------------------------------------------------------------
// Numbers as pydicom converts them
// ---------------------------------------------------------------------------------------------
std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\v\f";
  const std::size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  const std::size_t b = s.find_last_not_of(ws);
  return s.substr(a, b - a + 1);
}

std::vector<std::string> split_values(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t stop = s.find('\\', start);
    out.push_back(s.substr(start, stop == std::string::npos ? std::string::npos : stop - start));
    if (stop == std::string::npos) break;
    start = stop + 1;
  }
  return out;
}

[[noreturn]] void bad_attr(const std::string& name, const char* keyword, const std::string& value, const char* why) {
  fail(ErrorCode::Format, name, ": invalid rescale / VOI LUT / window attributes (", keyword, " '", value, "': ",
       why, ")");
}

double parse_double(const std::string& name, const char* keyword, const std::string& text) {
  const std::string t = trim(text);
  char* endp = nullptr;
  errno = 0;
  const double v = std::strtod(t.c_str(), &endp);
  if (t.empty() || !endp || *endp || errno == ERANGE) bad_attr(name, keyword, text, "not a decimal number");
  if (!std::isfinite(v)) bad_attr(name, keyword, text, "not a finite number");
  return v;
}

int64_t parse_int(const std::string& name, const char* keyword, const std::string& text) {
  const std::string t = trim(text);
  char* endp = nullptr;
  errno = 0;
  const long long v = std::strtoll(t.c_str(), &endp, 10);
  if (t.empty() || !endp || *endp || errno == ERANGE) {
    // IS values may be written as decimals ("1.0"); pydicom accepts whole ones
    const double d = std::strtod(t.c_str(), &endp);
    if (!t.empty() && endp && !*endp && std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) {
      return int64_t(d);
    }
    fail(ErrorCode::Format, name, ": invalid ", keyword, " value '", text, "' (expected an integer)");
  }
  return v;
}

// Single-valued numeric attribute with a value (rescale: a multi-valued one would broadcast
// nonsense in numpy; refused).
double single_double(const std::string& name, const char* keyword, const Attr& a) {
  if (!a.has_value()) bad_attr(name, keyword, a.value, "empty");
  if (a.value.find('\\') != std::string::npos) bad_attr(name, keyword, a.value, "several values");
  return parse_double(name, keyword, a.value);
}

// `int(ds.get(keyword, default) or fallback)`
int64_t int_or(const std::string& name, const char* keyword, const Attr& a, int64_t absent, int64_t empty) {
  if (!a.present) return absent;
  if (a.value.empty()) return empty;
  const std::vector<std::string> parts = split_values(a.value);
  if (parts.size() != 1) fail(ErrorCode::Format, name, ": ", keyword, " has several values '", a.value, "'");
  const int64_t v = parse_int(name, keyword, parts[0]);
  return v == 0 ? empty : v;
}

// ---------------------------------------------------------------------------------------------
// The stored value -> display grey pipeline
// ---------------------------------------------------------------------------------------------
struct IntType {
  int bits;  // 8, 16, 32 or 64
  bool is_signed;
  int64_t min() const { return is_signed ? (bits == 64 ? INT64_MIN : -(int64_t(1) << (bits - 1))) : 0; }
  int64_t max() const {
    if (bits == 64) return INT64_MAX;
    return is_signed ? (int64_t(1) << (bits - 1)) - 1 : (bits == 63 ? INT64_MAX : (int64_t(1) << bits) - 1);
  }
  int64_t wrap(int64_t x) const {
    if (bits >= 64) return x;
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    const uint64_t u = uint64_t(x) & mask;
    if (is_signed && ((u >> (bits - 1)) & 1)) return int64_t(u | ~mask);
    return int64_t(u);
  }
};

struct Value {
  bool is_float = false;
  double f = 0;
  int64_t i = 0;
  IntType type{64, true};
  double as_double() const { return is_float ? f : double(i); }
};

// A float -> uint8 / uint16 cast as numpy does it on x86-64 (through a 32-bit integer: values
// outside the int32 range become 0x80000000, whose low bits are 0).
int64_t float_to_uint(double v, int bits) {
  int64_t t;
  if (!(v > -2147483649.0 && v < 2147483648.0)) t = INT32_MIN;
  else t = int64_t(std::trunc(v));
  return int64_t(uint64_t(t) & ((uint64_t(1) << bits) - 1));
}

struct LutPlan {
  int64_t nr_entries = 0, first_map = 0;
  IntType out_type{16, false};
  std::vector<int64_t> data;
};

class Pipeline {
 public:
  Pipeline(const PixelAttrs& a, IntType stored_type, const std::string& name) : a_(a), stored_(stored_type), name_(name) {
    prepare();
  }

  // Display grey in [0, 1] of one stored value, or NaN when this value cannot be converted (the
  // message is in error()).
  float display(int64_t stored) const {
    bool ok = true;
    Value v = modality(Value{false, 0, stored, stored_}, ok);
    if (!ok) return std::numeric_limits<float>::quiet_NaN();
    double shown;
    if (mode_ == Mode::VoiLut) {
      Value s = voi(v, ok);
      if (!ok) return std::numeric_limits<float>::quiet_NaN();
      shown = s.as_double();
    } else if (mode_ == Mode::Window) {
      shown = window(v.as_double());
    } else {
      shown = v.as_double();
    }
    double unit = (shown - low_) / (high_ - low_);
    if (std::isnan(unit)) return std::numeric_limits<float>::quiet_NaN();
    unit = std::min(std::max(unit, 0.0), 1.0);
    if (mono1_) unit = 1.0 - unit;
    return float(unit);
  }
  const std::string& error() const { return error_; }

 private:
  enum class Mode { None, VoiLut, Window };

  [[noreturn]] void bad(const std::string& why) const {
    fail(ErrorCode::Format, name_, ": invalid rescale / VOI LUT / window attributes (", why, ")");
  }

  static LutPlan lut_plan(const LutItem& item, bool voi, const std::string& name) {
    auto bad = [&](const std::string& why) {
      fail(ErrorCode::Format, name, ": invalid ", voi ? "VOI LUT" : "Modality LUT", " (", why, ")");
    };
    if (!item.descriptor_present || item.descriptor.size() < 3) bad("LUTDescriptor needs 3 values");
    LutPlan p;
    p.nr_entries = item.descriptor[0] ? item.descriptor[0] : 65536;
    p.first_map = item.descriptor[1];
    const int64_t depth = item.descriptor[2];
    if (voi) {
      if (depth >= 10 && depth <= 16) p.out_type = IntType{16, false};
      else if (depth == 8) p.out_type = IntType{8, false};
      else bad(cat("'", depth, "' bits per LUT entry is not supported"));
    } else {
      if (depth != 8 && depth != 16 && depth != 32 && depth != 64) bad(cat("data type 'uint", depth, "' not understood"));
      p.out_type = IntType{int(depth), false};
    }
    if (!item.data_present) bad("no LUTData");
    if (p.nr_entries < 0) bad(cat("LUTDescriptor claims ", p.nr_entries, " entries"));
    if (item.data_ow) {
      // pydicom unpacks exactly nr_entries words (all of them for a Modality LUT)
      if (int64_t(item.data.size()) < p.nr_entries || (!voi && int64_t(item.data.size()) != p.nr_entries)) {
        bad(cat("LUTData holds ", item.data.size(), " entries, LUTDescriptor says ", p.nr_entries));
      }
      p.data.assign(item.data.begin(), item.data.begin() + p.nr_entries);
    } else {
      p.data = item.data;
    }
    for (int64_t v : p.data) {
      if (v < 0 || (p.out_type.bits < 64 && v > p.out_type.max())) {
        bad(cat("LUT entry ", v, " out of range for ", p.out_type.bits, "-bit entries"));
      }
    }
    return p;
  }

  // LUT lookup as pydicom: values below first_map use entry 0; the index (computed in the input's
  // integer type, or cast from float) is clipped to nr_entries - 1; an index past the data fails.
  bool lut_lookup(const LutPlan& p, const Value& v, IntType index_type, Value& out) const {
    int64_t idx = 0;
    const bool mapped = v.is_float ? v.f >= double(p.first_map) : v.i >= p.first_map;
    if (mapped) {
      if (v.is_float) {
        idx = float_to_uint(v.f - double(p.first_map), index_type.bits);
      } else {
        if (p.first_map < v.type.min() || p.first_map > v.type.max()) {
          error_ = cat("LUT first value mapped ", p.first_map, " does not fit the ", v.type.bits, "-bit pixel values");
          return false;
        }
        idx = index_type.wrap(v.type.wrap(v.i - p.first_map));
      }
    }
    idx = std::max<int64_t>(idx, 0);
    idx = std::min<int64_t>(idx, p.nr_entries - 1);
    if (idx < 0 || idx >= int64_t(p.data.size())) {
      error_ = cat("index ", idx, " is out of bounds for a LUT of ", p.data.size(), " entries");
      return false;
    }
    out = Value{false, 0, p.data[size_t(idx)], p.out_type};
    return true;
  }

  Value modality(const Value& v, bool& ok) const {
    if (has_modality_lut_) {
      Value out;
      ok = lut_lookup(modality_lut_, v, v.type, out);
      return out;
    }
    if (has_rescale_) {
      double x = v.as_double() * slope_;
      x += intercept_;
      return Value{true, x, 0, {64, true}};
    }
    return v;
  }

  Value voi(const Value& v, bool& ok) const {
    Value out;
    ok = lut_lookup(voi_lut_, v, voi_lut_.out_type, out);
    return out;
  }

  double window(double x) const {
    if (sigmoid_) return y_range_ / (1.0 + std::exp(-4.0 * (x - center_) / width_)) + y_min_;
    if (x <= center_ - width_ / 2) return y_min_;
    if (x > center_ + width_ / 2) return y_max_;
    return ((x - center_) / width_ + 0.5) * y_range_ + y_min_;
  }

  void prepare_window() {
    // pydicom's apply_windowing
    const std::string& pi = a_.photometric.value;
    if (!a_.photometric.present || (pi != "MONOCHROME1" && pi != "MONOCHROME2")) {
      bad("windowing needs PhotometricInterpretation MONOCHROME1 or MONOCHROME2");
    }
    std::string func = "LINEAR";
    if (a_.voi_function.present) {
      func = a_.voi_function.value;
      for (char& c : func) c = char(std::toupper(static_cast<unsigned char>(c)));
    }
    center_ = parse_double(name_, "WindowCenter", split_values(a_.window_center.value)[0]);
    width_ = parse_double(name_, "WindowWidth", split_values(a_.window_width.value)[0]);
    if (!a_.bits_stored.has_value()) bad("windowing needs BitsStored");
    const int64_t bits = parse_int(name_, "BitsStored", a_.bits_stored.value);
    double y_min, y_max;
    if (a_.modality_lut.truthy()) {
      const LutItem& item = a_.modality_lut.items[0];
      if (item.descriptor.size() < 3) bad("Modality LUTDescriptor needs 3 values");
      y_min = 0;
      y_max = std::ldexp(1.0, int(std::min<int64_t>(item.descriptor[2], 1100))) - 1;
    } else {
      if (!a_.pixel_rep.present) bad("windowing needs PixelRepresentation");
      const bool unsigned_ = a_.pixel_rep.has_value() && parse_int(name_, "PixelRepresentation", a_.pixel_rep.value) == 0;
      if (unsigned_) {
        y_min = 0;
        y_max = std::ldexp(1.0, int(std::min<int64_t>(bits, 1100))) - 1;
      } else {
        y_min = -std::ldexp(1.0, int(std::min<int64_t>(bits - 1, 1100)));
        y_max = std::ldexp(1.0, int(std::min<int64_t>(bits - 1, 1100))) - 1;
      }
    }
    if (a_.slope.has_value() && a_.intercept.has_value()) {
      const double s = single_double(name_, "RescaleSlope", a_.slope);
      const double i = single_double(name_, "RescaleIntercept", a_.intercept);
      y_min = y_min * s + i;
      y_max = y_max * s + i;
    }
    if (!std::isfinite(y_min) || !std::isfinite(y_max)) bad("output range of the window is not finite");
    y_min_ = y_min;
    y_max_ = y_max;
    y_range_ = y_max - y_min;
    if (func == "LINEAR" || func == "LINEAR_EXACT") {
      if (func == "LINEAR") {
        if (width_ < 1) bad("Window Width must be >= 1 for LINEAR windowing");
        center_ -= 0.5;
        width_ -= 1;
      } else if (width_ <= 0) {
        bad("Window Width must be > 0 for LINEAR_EXACT windowing");
      }
    } else if (func == "SIGMOID") {
      if (width_ <= 0) bad("Window Width must be > 0 for SIGMOID windowing");
      sigmoid_ = true;
    } else {
      bad(cat("unsupported VOI LUT Function '", func, "'"));
    }
  }

  void prepare() {
    // Modality LUT / rescale
    if (a_.modality_lut.truthy()) {
      has_modality_lut_ = true;
      modality_lut_ = lut_plan(a_.modality_lut.items[0], false, name_);
    } else if (a_.slope.present && a_.intercept.present) {
      has_rescale_ = true;
      slope_ = single_double(name_, "RescaleSlope", a_.slope);
      intercept_ = single_double(name_, "RescaleIntercept", a_.intercept);
    }
    const bool has_window = a_.window_center.present && a_.window_width.present;
    const bool valid_window = a_.window_center.has_value() && a_.window_width.has_value();
    if (a_.voi_lut.truthy()) {
      const LutItem& item = a_.voi_lut.items[0];
      const bool valid_voi = item.descriptor_present && !item.descriptor.empty() && item.data_present;
      if (valid_voi) {
        mode_ = Mode::VoiLut;
        voi_lut_ = lut_plan(item, true, name_);
      } else if (valid_window) {
        mode_ = Mode::Window;
        prepare_window();
      }
      if (!item.descriptor_present || item.descriptor.size() < 3) bad("VOI LUTDescriptor needs 3 values");
      const int64_t bits = item.descriptor[2];
      if (bits < 0 || bits > 1023) bad(cat("VOI LUT of ", bits, " bits"));
      low_ = 0.0;
      high_ = std::ldexp(1.0, int(bits)) - 1;
    } else if (has_window) {
      if (valid_window) {
        mode_ = Mode::Window;
        prepare_window();
        low_ = window(-1e12);
        high_ = window(1e12);
      } else {  // an empty WindowCenter / WindowWidth: pydicom applies nothing, the probe spans +-1e12
        low_ = -1e12;
        high_ = 1e12;
      }
    } else {
      const int64_t bits = int_or(name_, "BitsStored", a_.bits_stored, stored_.bits, 8);
      const bool is_signed = int_or(name_, "PixelRepresentation", a_.pixel_rep, 0, 0) == 1;
      if (bits < 1 || bits > 63) bad(cat("BitsStored ", bits));
      const int64_t lo = is_signed ? -(int64_t(1) << (bits - 1)) : 0;
      const int64_t hi = is_signed ? (int64_t(1) << (bits - 1)) - 1 : (int64_t(1) << bits) - 1;
      bool ok_lo = true, ok_hi = true;
      const Value vlo = modality(Value{false, 0, lo, {64, true}}, ok_lo);
      const Value vhi = modality(Value{false, 0, hi, {64, true}}, ok_hi);
      if (!ok_lo || !ok_hi) bad(error_);
      low_ = vlo.as_double();
      high_ = vhi.as_double();
    }
    if (high_ == low_) bad(cat("degenerate display range [", low_, ", ", high_, "]"));
    if (!std::isfinite(low_) || !std::isfinite(high_)) bad("display range is not finite");
    const std::string pi = trim(a_.photometric.value);
    std::string up = pi;
    for (char& c : up) c = char(std::toupper(static_cast<unsigned char>(c)));
    mono1_ = up == "MONOCHROME1";
  }

  const PixelAttrs& a_;
  IntType stored_;
  std::string name_;
  Mode mode_ = Mode::None;
  bool has_modality_lut_ = false, has_rescale_ = false, sigmoid_ = false, mono1_ = false;
  double slope_ = 1, intercept_ = 0;
  LutPlan modality_lut_, voi_lut_;
  double center_ = 0, width_ = 1, y_min_ = 0, y_max_ = 0, y_range_ = 0;
  double low_ = 0, high_ = 1;
  mutable std::string error_;
};

// dicom_refusal() and the header checks of _load_dicom, in the same order.
void check_image_attrs(const PixelAttrs& a, const std::string& name) {
  const int64_t frames = int_or(name, "NumberOfFrames", a.frames, 1, 1);
  if (frames > 1) {
    fail(ErrorCode::Format, name, ": multi-frame DICOM (", frames, " frames) is not supported; export one frame per file");
  }
  std::string photometric = a.photometric.present ? trim(a.photometric.value) : "MONOCHROME2";
  for (char& c : photometric) c = char(std::toupper(static_cast<unsigned char>(c)));
  const int64_t samples = int_or(name, "SamplesPerPixel", a.samples, 1, 1);
  if (samples != 1 || (photometric != "MONOCHROME1" && photometric != "MONOCHROME2")) {
    fail(ErrorCode::Format, name, ": colour DICOM (PhotometricInterpretation ", photometric, ", SamplesPerPixel ",
         samples, ") is not supported; chest X-rays must be MONOCHROME1 or MONOCHROME2");
  }
  if (frames < 1) fail(ErrorCode::Format, name, ": invalid NumberOfFrames ", frames);
}

void check_size(int64_t width, int64_t height, const std::string& name) {
  if (width * height > kMaxImagePixels) {
    fail(ErrorCode::Invalid, name, ": image claims ", width, " x ", height, " pixels (", width * height,
         "), over the limit of ", kMaxImagePixels, "; not decoded");
  }
  if (width > kMaxImageSide || height > kMaxImageSide) {
    fail(ErrorCode::Invalid, name, ": image claims ", width, " x ", height, " pixels, over the limit of ",
         kMaxImageSide, " a side; not decoded");
  }
  if (width < kMinImageSide || height < kMinImageSide) {
    fail(ErrorCode::Invalid, name, ": image of (", height, ", ", width, ") pixels is too small to be a radiograph (at least ",
         kMinImageSide, " x ", kMinImageSide, ")");
  }
}

// Stored words -> display grey. word(i) gives the raw word of pixel i (row-major).
struct StoredLayout {
  int bits_allocated = 16;
  int bits_stored = 16;
  bool is_signed = false;
};

template <typename WordAt>
Image convert(const PixelAttrs& attrs, const StoredLayout& lay, int32_t width, int32_t height, WordAt word,
              const std::string& name) {
  const IntType stored_type{lay.bits_allocated, lay.is_signed};
  Pipeline pipe(attrs, stored_type, name);
  const uint64_t mask = lay.bits_stored >= 64 ? ~uint64_t(0) : (uint64_t(1) << lay.bits_stored) - 1;
  auto value_of = [&](uint64_t w) -> int64_t {
    const uint64_t u = w & mask;
    if (lay.is_signed && ((u >> (lay.bits_stored - 1)) & 1)) return int64_t(u | ~mask);
    return int64_t(u);
  };
  Image img(width, height);
  float* out = img.data();
  const int64_t n = int64_t(width) * height;
  auto failed = [&](int64_t i, uint64_t w) {
    fail(ErrorCode::Format, name, ": invalid rescale / VOI LUT / window attributes (stored value ", value_of(w),
         " of pixel ", i, ": ", pipe.error(), ")");
  };
  if (lay.bits_allocated <= 16) {
    std::vector<float> table(std::size_t(1) << lay.bits_allocated);
    for (std::size_t w = 0; w < table.size(); ++w) table[w] = pipe.display(value_of(w));
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) {
      const float v = table[word(i)];
      bad |= std::isnan(v);
      out[i] = v;
    }
    if (bad) {
      for (int64_t i = 0; i < n; ++i)
        if (std::isnan(out[i])) {
          (void)pipe.display(value_of(word(i)));  // sets the message
          failed(i, word(i));
        }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float v = pipe.display(value_of(word(i)));
      if (std::isnan(v)) failed(i, word(i));
      out[i] = v;
    }
  }
  return img;
}

StoredLayout layout_of(const PixelAttrs& a, const std::string& name) {
  StoredLayout lay;
  // pydicom's pixel_array needs all of these
  if (!a.samples.present) fail(ErrorCode::Format, name, ": no SamplesPerPixel in the DICOM header");
  if (!a.photometric.present) fail(ErrorCode::Format, name, ": no PhotometricInterpretation in the DICOM header");
  if (!a.bits_allocated.has_value()) fail(ErrorCode::Format, name, ": no BitsAllocated in the DICOM header");
  if (!a.bits_stored.has_value()) fail(ErrorCode::Format, name, ": no BitsStored in the DICOM header");
  if (!a.pixel_rep.has_value()) fail(ErrorCode::Format, name, ": no PixelRepresentation in the DICOM header");
  const int64_t ba = parse_int(name, "BitsAllocated", a.bits_allocated.value);
  const int64_t bs = parse_int(name, "BitsStored", a.bits_stored.value);
  const int64_t pr = parse_int(name, "PixelRepresentation", a.pixel_rep.value);
  if (ba != 8 && ba != 16 && ba != 32) {
    fail(ErrorCode::Unsupported, name, ": BitsAllocated ", ba, " is not supported (8, 16 or 32 bits a pixel)");
  }
  if (bs < 1 || bs > ba) fail(ErrorCode::Format, name, ": BitsStored ", bs, " with BitsAllocated ", ba);
  if (pr != 0 && pr != 1) fail(ErrorCode::Format, name, ": PixelRepresentation ", pr, " (must be 0 or 1)");
  lay.bits_allocated = int(ba);
  lay.bits_stored = int(bs);
  lay.is_signed = pr == 1;
  return lay;
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------
Attr attr_of(const Dataset& ds, uint32_t tag, bool little, const char* keyword, const std::string& name) {
  Attr a;
  const Element* el = ds.find(tag);
  if (!el) return a;
  a.present = true;
  if (el->is_sequence) fail(ErrorCode::Format, name, ": ", keyword, " is a sequence");
  if (is_vr(*el, "US") || is_vr(*el, "SS") || is_vr(*el, "UL") || is_vr(*el, "SL")) {
    a.value = ints_as_text(ints_of(*el, little, false, name, keyword));
  } else {
    a.value = text_of(*el);
  }
  return a;
}

LutSeq lut_seq_of(const Dataset& ds, uint32_t tag, bool little, bool pixel_rep_signed, const std::string& name) {
  LutSeq seq;
  const Element* el = ds.find(tag);
  if (!el) return seq;
  seq.present = true;
  if (!el->is_sequence) {
    if (el->length == 0) return seq;  // an empty non-sequence: treated as an empty sequence
    fail(ErrorCode::Format, name, ": ", hex_tag(tag), " is not a sequence");
  }
  for (const Dataset& item : el->items) {
    LutItem li;
    if (const Element* d = item.find(kLutDescriptor)) {
      li.descriptor = ints_of(*d, little, d->implicit && pixel_rep_signed, name, "LUTDescriptor");
      li.descriptor_present = !li.descriptor.empty();
      // the first value (number of entries) is always unsigned
      if (!li.descriptor.empty() && li.descriptor[0] < 0) li.descriptor[0] += 65536;
    }
    if (const Element* d = item.find(kLutData)) {
      li.data = ints_of(*d, little, false, name, "LUTData");
      li.data_present = !li.data.empty();
      li.data_ow = is_vr(*d, "OW") || (d->implicit && !(li.descriptor.size() >= 1 && li.descriptor[0] == 1));
    }
    seq.items.push_back(std::move(li));
  }
  return seq;
}

std::string seq_text(const Dataset& ds, uint32_t seq_tag, uint32_t tag) {
  const Element* el = ds.find(seq_tag);
  if (!el || !el->is_sequence || el->items.empty()) return "";
  const Element* v = el->items[0].find(tag);
  return v && !v->is_sequence ? text_of(*v) : "";
}

std::vector<uint8_t> inflate_raw(const uint8_t* data, std::size_t size, const std::string& name) {
#ifdef CLINVLA_DICOM_NO_ZLIB
  (void)data;
  (void)size;
  fail(ErrorCode::Unsupported, name, ": Deflated Explicit VR Little Endian needs zlib, which this libclinvla was "
       "built without; convert the file (e.g. dcmconv +te) or rebuild with zlib1g-dev installed");
#else
  std::vector<uint8_t> out;
  z_stream zs;
  std::memset(&zs, 0, sizeof zs);
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) fail(ErrorCode::Internal, name, ": zlib inflateInit2 failed");
  zs.next_in = const_cast<Bytef*>(data);
  zs.avail_in = uInt(std::min<std::size_t>(size, 0x7FFFFFFF));
  int rc = Z_OK;
  out.resize(std::min<std::size_t>(std::max<std::size_t>(size * 4, 1 << 16), kMaxInflatedBytes));
  std::size_t have = 0;
  while (rc != Z_STREAM_END) {
    if (have == out.size()) {
      if (out.size() >= kMaxInflatedBytes) {
        inflateEnd(&zs);
        fail(ErrorCode::Invalid, name, ": deflated data set inflates to over ", kMaxInflatedBytes, " bytes; not decoded");
      }
      out.resize(std::min<std::size_t>(out.size() * 2, kMaxInflatedBytes));
    }
    zs.next_out = out.data() + have;
    zs.avail_out = uInt(std::min<std::size_t>(out.size() - have, 0x7FFFFFFF));
    rc = inflate(&zs, Z_NO_FLUSH);
    have = std::size_t(zs.next_out - out.data());
    if (rc == Z_STREAM_END) break;
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      inflateEnd(&zs);
      fail(ErrorCode::Format, name, ": corrupt deflated data set (zlib: ", zs.msg ? zs.msg : "error", ")");
    }
    if (rc == Z_BUF_ERROR && zs.avail_in == 0) {
      inflateEnd(&zs);
      fail(ErrorCode::Format, name, ": truncated deflated data set");
    }
  }
  inflateEnd(&zs);
  out.resize(have);
  return out;
#endif
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------
Image read_dicom_buffer(const uint8_t* data, std::size_t size, const std::string& name, DicomTags* tags) {
  if (size == 0) fail(ErrorCode::Format, name, ": empty file (0 bytes); the copy or download was probably cut short");
  if (size < 132 || std::memcmp(data + 128, "DICM", 4) != 0) {
    fail(ErrorCode::Format, name, ": not a DICOM Part 10 file (no 'DICM' marker at byte 128)");
  }
  // File meta information: explicit VR little endian, group 0002.
  std::size_t meta_end = 132;
  while (meta_end + 4 <= size && data[meta_end] == 0x02 && data[meta_end + 1] == 0x00) {
    if (meta_end + 8 > size) break;
    const bool long_vr = long_length_vr(reinterpret_cast<const char*>(data + meta_end + 4));
    std::size_t len, head;
    if (long_vr) {
      if (meta_end + 12 > size) fail(ErrorCode::Format, name, ": truncated file meta information");
      len = uint32_t(data[meta_end + 8]) | (uint32_t(data[meta_end + 9]) << 8) | (uint32_t(data[meta_end + 10]) << 16) |
            (uint32_t(data[meta_end + 11]) << 24);
      head = 12;
    } else {
      len = uint16_t(data[meta_end + 6] | (data[meta_end + 7] << 8));
      head = 8;
    }
    if (len > size - meta_end - head) fail(ErrorCode::Format, name, ": truncated file meta information");
    meta_end += head + len;
  }
  Parser meta_parser(data, size, name, true, true);
  const Dataset meta = meta_parser.parse(132, meta_end);
  std::string ts_uid;
  if (const Element* el = meta.find(kTransferSyntax)) ts_uid = text_of(*el);
  Syntax syntax;
  if (ts_uid.empty()) {
    // pydicom reads the header of such a file but refuses to decode its pixels
    fail(ErrorCode::Format, name, ": no TransferSyntaxUID (0002,0010) in the file meta information, so the pixel "
         "data cannot be decoded; the file is corrupt or was not written as a DICOM Part 10 file");
  } else {
    syntax = syntax_of(ts_uid);
    if (!syntax.known) {
      fail(ErrorCode::Unsupported, name, ": unknown transfer syntax ", ts_uid,
           "; convert the file to Explicit VR Little Endian (e.g. dcmconv +te) or decode it in the PACS");
    }
  }
  std::vector<uint8_t> inflated;
  const uint8_t* body = data;
  std::size_t body_begin = meta_end, body_end = size;
  if (syntax.deflated) {
    inflated = inflate_raw(data + meta_end, size - meta_end, name);
    body = inflated.data();
    body_begin = 0;
    body_end = inflated.size();
  }
  Parser parser(body, body_end, name, syntax.explicit_vr, syntax.little_endian);
  const Dataset ds = parser.parse(body_begin, body_end);
  const bool little = syntax.little_endian;

  PixelAttrs a;
  a.photometric = attr_of(ds, kPhotometric, little, "PhotometricInterpretation", name);
  a.samples = attr_of(ds, kSamplesPerPixel, little, "SamplesPerPixel", name);
  a.frames = attr_of(ds, kNumberOfFrames, little, "NumberOfFrames", name);
  a.rows = attr_of(ds, kRows, little, "Rows", name);
  a.columns = attr_of(ds, kColumns, little, "Columns", name);
  a.bits_allocated = attr_of(ds, kBitsAllocated, little, "BitsAllocated", name);
  a.bits_stored = attr_of(ds, kBitsStored, little, "BitsStored", name);
  a.pixel_rep = attr_of(ds, kPixelRepresentation, little, "PixelRepresentation", name);
  a.slope = attr_of(ds, kRescaleSlope, little, "RescaleSlope", name);
  a.intercept = attr_of(ds, kRescaleIntercept, little, "RescaleIntercept", name);
  a.window_center = attr_of(ds, kWindowCenter, little, "WindowCenter", name);
  a.window_width = attr_of(ds, kWindowWidth, little, "WindowWidth", name);
  a.voi_function = attr_of(ds, kVoiLutFunction, little, "VOILUTFunction", name);
  a.modality = attr_of(ds, kModality, little, "Modality", name);
  const bool pr_signed = a.pixel_rep.has_value() && trim(a.pixel_rep.value) == "1";
  a.modality_lut = lut_seq_of(ds, kModalityLutSequence, little, pr_signed, name);
  a.voi_lut = lut_seq_of(ds, kVoiLutSequence, little, pr_signed, name);
  const Element* pixel_data = ds.find(kPixelData);
  a.has_pixel_data = pixel_data != nullptr;

  int64_t rows = 0, columns = 0;
  if (a.rows.has_value()) rows = parse_int(name, "Rows", a.rows.value);
  if (a.columns.has_value()) columns = parse_int(name, "Columns", a.columns.value);
  if (tags) {
    *tags = DicomTags{};
    tags->modality = a.modality.value;
    if (const Element* el = ds.find(kViewPosition)) tags->view_position = el->is_sequence ? "" : text_of(*el);
    tags->view_code_scheme = seq_text(ds, kViewCodeSequence, kCodingScheme);
    tags->view_code_value = seq_text(ds, kViewCodeSequence, kCodeValue);
    tags->view_code_meaning = seq_text(ds, kViewCodeSequence, kCodeMeaning);
    if (const Element* el = ds.find(kPatientOrientation)) tags->patient_orientation = el->is_sequence ? "" : text_of(*el);
    if (const Element* el = ds.find(kStudyUid)) tags->study_instance_uid = text_of(*el);
    if (const Element* el = ds.find(kSeriesUid)) tags->series_instance_uid = text_of(*el);
    if (const Element* el = ds.find(kSopUid)) tags->sop_instance_uid = text_of(*el);
    tags->transfer_syntax_uid = ts_uid;
    tags->rows = int32_t(std::min<int64_t>(rows, INT32_MAX));
    tags->columns = int32_t(std::min<int64_t>(columns, INT32_MAX));
  }

  check_image_attrs(a, name);
  if (!a.has_pixel_data) {
    fail(ErrorCode::Format, name, ": DICOM file has no pixel data (Modality ",
         a.modality.present ? a.modality.value : "?", "); it is not an image");
  }
  if (rows < 0 || columns < 0) fail(ErrorCode::Format, name, ": invalid Rows / Columns ", rows, " x ", columns);
  check_size(columns, rows, name);
  if (syntax.compressed) {
    fail(ErrorCode::Unsupported, name, ": compressed pixel data (transfer syntax ", syntax.name, ", ", ts_uid,
         ") is not decoded by libclinvla; decode it in the PACS (the Orthanc plugin takes pixels from Orthanc's "
         "decoder: clinvla_display_from_stored) or convert the file to an uncompressed syntax (e.g. dcmdjpeg or "
         "gdcmconv --raw)");
  }
  if (pixel_data->undefined_length) {
    fail(ErrorCode::Format, name, ": encapsulated pixel data in the uncompressed transfer syntax ", syntax.name);
  }
  const StoredLayout lay = layout_of(a, name);
  const std::size_t bytes_per = std::size_t(lay.bits_allocated / 8);
  const std::size_t expected = std::size_t(rows) * std::size_t(columns) * bytes_per;
  if (pixel_data->length < expected) {
    fail(ErrorCode::Format, name, ": cannot decode the pixel data (transfer syntax ", syntax.name,
         "): the number of bytes of pixel data is less than expected (", pixel_data->length, " vs ", expected,
         " bytes); the file may be truncated");
  }
  const uint8_t* px = pixel_data->value;
  const int32_t w = int32_t(columns), h = int32_t(rows);
  if (lay.bits_allocated == 8) {
    return convert(a, lay, w, h, [px](int64_t i) -> uint64_t { return px[i]; }, name);
  }
  if (lay.bits_allocated == 16) {
    if (little) {
      return convert(a, lay, w, h, [px](int64_t i) -> uint64_t { return uint16_t(px[2 * i] | (px[2 * i + 1] << 8)); },
                     name);
    }
    return convert(a, lay, w, h, [px](int64_t i) -> uint64_t { return uint16_t((px[2 * i] << 8) | px[2 * i + 1]); },
                   name);
  }
  return convert(
      a, lay, w, h,
      [px, little](int64_t i) -> uint64_t {
        const uint8_t* p = px + 4 * i;
        return little ? (uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24))
                      : ((uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]));
      },
      name);
}

Image read_dicom(const std::string& path, DicomTags* tags) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    fail(ErrorCode::IO, path, ": ", errno == ENOENT ? "no such file" : std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode)) fail(ErrorCode::IO, path, ": is a folder, not an image file");
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) fail(ErrorCode::IO, path, ": cannot read the file (", std::strerror(errno), ")");
  std::vector<uint8_t> buf;
  // The file's own size bounds the buffer; a file that grows while read is read to its size then.
  buf.resize(std::size_t(st.st_size));
  const std::size_t got = buf.empty() ? 0 : std::fread(buf.data(), 1, buf.size(), f.get());
  if (got != buf.size()) fail(ErrorCode::IO, path, ": read ", got, " of ", buf.size(), " bytes");
  return read_dicom_buffer(buf.data(), buf.size(), path, tags);
}

// ---------------------------------------------------------------------------------------------
// Stored values + attributes as JSON (Orthanc's "simplified" tags)
// ---------------------------------------------------------------------------------------------
namespace {

std::string json_scalar(const nlohmann::json& v, const char* keyword) {
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
    return s;
  }
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) {
    std::ostringstream os;
    os.precision(17);
    os << v.get<double>();
    return os.str();
  }
  fail(ErrorCode::Invalid, "attributes JSON: ", keyword, " must be a string or a number, got ", v.type_name());
}

Attr json_attr(const nlohmann::json& obj, const char* keyword) {
  Attr a;
  auto it = obj.find(keyword);
  if (it == obj.end() || it->is_null()) return a;
  a.present = true;
  if (it->is_array()) {
    for (std::size_t i = 0; i < it->size(); ++i) {
      if (i) a.value += '\\';
      a.value += json_scalar((*it)[i], keyword);
    }
  } else {
    a.value = json_scalar(*it, keyword);
  }
  return a;
}

std::vector<int64_t> json_ints(const nlohmann::json& v, const char* keyword) {
  std::vector<int64_t> out;
  if (v.is_array()) {
    for (const auto& x : v) {
      if (!x.is_number_integer()) fail(ErrorCode::Invalid, "attributes JSON: ", keyword, " must hold integers");
      out.push_back(x.get<int64_t>());
    }
    return out;
  }
  const std::string s = json_scalar(v, keyword);
  if (s.empty()) return out;
  for (const std::string& part : split_values(s)) out.push_back(parse_int("attributes JSON", keyword, part));
  return out;
}

LutSeq json_lut_seq(const nlohmann::json& obj, const char* keyword) {
  LutSeq seq;
  auto it = obj.find(keyword);
  if (it == obj.end() || it->is_null()) return seq;
  seq.present = true;
  if (it->is_string() && it->get<std::string>().empty()) return seq;
  if (!it->is_array()) fail(ErrorCode::Invalid, "attributes JSON: ", keyword, " must be an array of objects");
  for (const auto& item : *it) {
    if (!item.is_object()) fail(ErrorCode::Invalid, "attributes JSON: ", keyword, " items must be objects");
    LutItem li;
    auto d = item.find("LUTDescriptor");
    if (d != item.end() && !d->is_null()) {
      li.descriptor = json_ints(*d, "LUTDescriptor");
      li.descriptor_present = !li.descriptor.empty();
    }
    auto data = item.find("LUTData");
    if (data != item.end() && !data->is_null()) {
      li.data = json_ints(*data, "LUTData");
      li.data_present = !li.data.empty();
    }
    seq.items.push_back(std::move(li));
  }
  return seq;
}

}  // namespace

Image display_from_stored(const PixelsView& stored, const std::string& attributes_json) {
  const std::string name = "stored pixels";
  if (!stored.data) fail(ErrorCode::Invalid, "stored pixels: data is a null pointer");
  if (stored.type != PixelType::U8 && stored.type != PixelType::U16) {
    fail(ErrorCode::Invalid, "stored pixels must be U8 or U16 stored values (signed ones as 16-bit two's complement), got type ",
         int(stored.type));
  }
  const int64_t pixel_size = stored.type == PixelType::U8 ? 1 : 2;
  check_size(stored.width, stored.height, name);
  if (stored.row_stride_bytes < int64_t(stored.width) * pixel_size) {
    fail(ErrorCode::Invalid, "stored pixels: row_stride_bytes ", stored.row_stride_bytes, " is less than width ",
         stored.width, " x ", pixel_size, " bytes");
  }
  nlohmann::json obj;
  try {
    obj = nlohmann::json::parse(attributes_json);
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::Invalid, "attributes JSON is not valid JSON (", e.what(), ")");
  }
  if (!obj.is_object()) fail(ErrorCode::Invalid, "attributes JSON must be an object of DICOM keywords to values");
  PixelAttrs a;
  a.photometric = json_attr(obj, "PhotometricInterpretation");
  a.samples = json_attr(obj, "SamplesPerPixel");
  a.frames = json_attr(obj, "NumberOfFrames");
  a.rows = json_attr(obj, "Rows");
  a.columns = json_attr(obj, "Columns");
  a.bits_allocated = json_attr(obj, "BitsAllocated");
  a.bits_stored = json_attr(obj, "BitsStored");
  a.pixel_rep = json_attr(obj, "PixelRepresentation");
  a.slope = json_attr(obj, "RescaleSlope");
  a.intercept = json_attr(obj, "RescaleIntercept");
  a.window_center = json_attr(obj, "WindowCenter");
  a.window_width = json_attr(obj, "WindowWidth");
  a.voi_function = json_attr(obj, "VOILUTFunction");
  a.modality = json_attr(obj, "Modality");
  a.modality_lut = json_lut_seq(obj, "ModalityLUTSequence");
  a.voi_lut = json_lut_seq(obj, "VOILUTSequence");
  a.has_pixel_data = true;
  check_image_attrs(a, name);
  if (a.rows.has_value() && parse_int(name, "Rows", a.rows.value) != stored.height) {
    fail(ErrorCode::Invalid, "stored pixels: height ", stored.height, " but the attributes say Rows ", a.rows.value);
  }
  if (a.columns.has_value() && parse_int(name, "Columns", a.columns.value) != stored.width) {
    fail(ErrorCode::Invalid, "stored pixels: width ", stored.width, " but the attributes say Columns ", a.columns.value);
  }
  // The decoder's buffer fixes the word size; BitsStored / PixelRepresentation default as pydicom's
  // pixel_array would need them.
  if (!a.bits_allocated.has_value()) { a.bits_allocated.present = true; a.bits_allocated.value = std::to_string(pixel_size * 8); }
  if (parse_int(name, "BitsAllocated", a.bits_allocated.value) != pixel_size * 8) {
    fail(ErrorCode::Invalid, "stored pixels: ", pixel_size * 8, "-bit buffer but the attributes say BitsAllocated ",
         a.bits_allocated.value);
  }
  if (!a.bits_stored.present) { a.bits_stored.present = true; a.bits_stored.value = a.bits_allocated.value; }
  if (!a.pixel_rep.present) { a.pixel_rep.present = true; a.pixel_rep.value = "0"; }
  if (!a.samples.present) { a.samples.present = true; a.samples.value = "1"; }  // one grey plane was given
  const StoredLayout lay = layout_of(a, name);
  const uint8_t* base = static_cast<const uint8_t*>(stored.data);
  const int64_t stride = stored.row_stride_bytes;
  const int32_t w = stored.width;
  if (pixel_size == 1) {
    return convert(a, lay, w, stored.height, [=](int64_t i) -> uint64_t { return base[(i / w) * stride + i % w]; }, name);
  }
  return convert(
      a, lay, w, stored.height,
      [=](int64_t i) -> uint64_t {
        uint16_t v;
        std::memcpy(&v, base + (i / w) * stride + 2 * (i % w), 2);
        return v;
      },
      name);
}

}  // namespace clinvla
