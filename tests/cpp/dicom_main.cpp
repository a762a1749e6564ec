// Test driver for libclinvla's images, DICOM reading and view rules (tests/test_dicom_cpp.py).
// Goes through the C API (clinvla/engine.h) where one exists, so status codes and
// clinvla_last_error() are checked too. Every command prints one JSON object per result.
//
//   dicom_main read FILE OUT.f32                  decode a DICOM file; pixels as raw float32
//   dicom_main stored RAW W H u8|u16 STRIDE ATTRS.json OUT.f32
//                                                 stored values + attributes -> display grey
//   dicom_main pixels RAW W H u8|u16|f32 STRIDE OUT.f32   decoded pixels -> [0, 1]
//   dicom_main classify RULES.json|-              headers on stdin, one a line: the six ViewTags
//                                                 fields (modality, view_position, scheme, value,
//                                                 meaning, patient_orientation) hex-encoded and
//                                                 space-separated -> one decision a line
//   dicom_main bench FILE N                       decode N times, print the median seconds
// (No JSON library here, so that the test builds fast: the output is written by hand.)
#include <clinvla/dicom.hpp>
#include <clinvla/engine.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c < 0x20 || c == 0x7F || c >= 0x80) {  // \u00XX keeps the output ASCII whatever the bytes
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

std::string opt(const std::string& s) { return s.empty() ? "null" : quote(s); }

std::vector<char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_image(const clinvla_image* img, const std::string& out) {
  FILE* f = std::fopen(out.c_str(), "wb");
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", out.c_str());
    std::exit(2);
  }
  const size_t n = size_t(clinvla_image_width(img)) * size_t(clinvla_image_height(img));
  std::fwrite(clinvla_image_data(img), sizeof(float), n, f);
  std::fclose(f);
}

// "status", "error" and, on success, "width" / "height" (the pixels go to `out`).
std::string result(clinvla_status st, clinvla_image* img, const std::string& out) {
  std::ostringstream j;
  j << "\"status\": " << int(st) << ", \"error\": " << quote(clinvla_last_error());
  if (st == CLINVLA_OK) {
    j << ", \"width\": " << clinvla_image_width(img) << ", \"height\": " << clinvla_image_height(img);
    write_image(img, out);
  } else if (img != nullptr) {
    j << ", \"bug\": \"an image was returned with an error status\"";
  }
  clinvla_image_free(img);
  return j.str();
}

clinvla_pixel_type parse_type(const std::string& t) {
  if (t == "u8") return CLINVLA_PIXEL_U8;
  if (t == "u16") return CLINVLA_PIXEL_U16;
  if (t == "f32") return CLINVLA_PIXEL_F32;
  std::fprintf(stderr, "unknown pixel type %s\n", t.c_str());
  std::exit(2);
}

std::string unhex(const std::string& h) {
  if (h == "-") return "";
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += char(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

template <size_t N>
void put(char (&dst)[N], const std::string& s) {
  const size_t n = std::min(s.size(), N - 1);
  std::copy(s.begin(), s.begin() + long(n), dst);
  dst[n] = '\0';
}

const char* view_json(clinvla_view v) {
  return v == CLINVLA_VIEW_FRONTAL ? "\"frontal\"" : v == CLINVLA_VIEW_LATERAL ? "\"lateral\"" : "null";
}

int classify(const std::string& rules_arg) {
  const bool installed = rules_arg == "-";
  clinvla_view_rules* rules = nullptr;
  const clinvla_status st = clinvla_view_rules_load(installed ? nullptr : rules_arg.c_str(), &rules);
  if (st != CLINVLA_OK) {
    std::cout << "{\"status\": " << int(st) << ", \"error\": " << quote(clinvla_last_error()) << "}\n";
    return 0;
  }
  const clinvla::ViewRules cpp = installed ? clinvla::ViewRules::load_default() : clinvla::ViewRules::load(rules_arg);
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string f[6];
    for (auto& x : f) {
      in >> x;
      x = unhex(x);
    }
    const clinvla::ViewTags t{f[0], f[1], f[2], f[3], f[4], f[5]};
    const clinvla::ViewDecision d = cpp.classify(t);
    clinvla_dicom_tags ct{};
    put(ct.modality, t.modality);
    put(ct.view_position, t.view_position);
    put(ct.view_code_meaning, t.view_code_meaning);
#ifdef CLINVLA_DICOM_TAGS_VIEW_CODE
    put(ct.view_code_scheme, t.view_code_scheme);
    put(ct.view_code_value, t.view_code_value);
    const char* has_code = "true";
#else
    const char* has_code = "false";
#endif
    put(ct.patient_orientation, t.patient_orientation);
    clinvla_view v = CLINVLA_VIEW_NONE;
    char label[32] = "", rule[32] = "";
    const clinvla_status s = clinvla_view_classify(rules, &ct, &v, label, rule);
    std::cout << "{\"view\": " << (d.view == clinvla::View::None ? "null" : quote(clinvla::view_name(d.view)))
              << ", \"rule\": " << quote(d.rule) << ", \"label\": " << opt(d.label)
              << ", \"capi_has_view_code\": " << has_code << ", \"capi\": {\"status\": " << int(s)
              << ", \"view\": " << view_json(v) << ", \"rule\": " << quote(rule) << ", \"label\": " << opt(label)
              << "}}\n";
  }
  clinvla_view_rules_free(rules);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "read" && argc == 4) {
    clinvla_image* img = nullptr;
    clinvla_dicom_tags tags;
    const clinvla_status st = clinvla_dicom_read_image(argv[2], &img, &tags);
    std::cout << "{" << result(st, img, argv[3]) << ", \"tags\": {\"Modality\": " << quote(tags.modality)
              << ", \"ViewPosition\": " << quote(tags.view_position)
              << ", \"ViewCodeMeaning\": " << quote(tags.view_code_meaning)
              << ", \"PatientOrientation\": " << quote(tags.patient_orientation)
              << ", \"StudyInstanceUID\": " << quote(tags.study_instance_uid)
              << ", \"SeriesInstanceUID\": " << quote(tags.series_instance_uid)
              << ", \"SOPInstanceUID\": " << quote(tags.sop_instance_uid) << "}}\n";
    return 0;
  }
  if ((cmd == "stored" && argc == 9) || (cmd == "pixels" && argc == 8)) {
    const std::vector<char> raw = slurp(argv[2]);
    clinvla_pixels p{};
    p.data = raw.data();
    p.width = std::atoi(argv[3]);
    p.height = std::atoi(argv[4]);
    p.type = parse_type(argv[5]);
    p.row_stride_bytes = std::atoll(argv[6]);
    const int64_t psize = p.type == CLINVLA_PIXEL_U8 ? 1 : p.type == CLINVLA_PIXEL_U16 ? 2 : 4;
    if (int64_t(raw.size()) < (p.height > 0 ? int64_t(p.height - 1) * p.row_stride_bytes + p.width * psize : 0)) {
      std::fprintf(stderr, "raw file too small for the given shape\n");
      return 2;
    }
    clinvla_image* img = nullptr;
    clinvla_status st;
    if (cmd == "stored") {
      const std::vector<char> attrs = slurp(argv[7]);
      st = clinvla_display_from_stored(&p, std::string(attrs.begin(), attrs.end()).c_str(), &img);
    } else {
      st = clinvla_image_from_pixels(&p, &img);
    }
    std::cout << "{" << result(st, img, argv[cmd == "stored" ? 8 : 7]) << "}\n";
    return 0;
  }
  if (cmd == "classify" && argc == 3) return classify(argv[2]);
  if (cmd == "bench" && argc == 4) {
    const int n = std::max(1, std::atoi(argv[3]));
    std::vector<double> times;
    for (int i = 0; i < n; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      clinvla_image* img = nullptr;
      if (clinvla_dicom_read_image(argv[2], &img, nullptr) != CLINVLA_OK) {
        std::cout << "{\"error\": " << quote(clinvla_last_error()) << "}\n";
        return 1;
      }
      clinvla_image_free(img);
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    std::cout << "{\"median_s\": " << times[times.size() / 2] << ", \"min_s\": " << times.front() << ", \"n\": " << n
              << "}\n";
    return 0;
  }
  std::fprintf(stderr, "usage: see the top of tests/cpp/dicom_main.cpp\n");
  return 2;
}
