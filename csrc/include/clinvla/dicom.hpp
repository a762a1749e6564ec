// libclinvla: images, DICOM reading, display conversion and the frontal / lateral view rules in C++.
//
// Everything here equals the Python pipeline (clinvla_engine.data.io.load_image for DICOM,
// clinvla_engine.data.transforms.to_unit_float for raw pixels, clinvla_engine.data.views for the
// view rules): tests/test_dicom_cpp.py compares both sides on the same files and vectors.
//
//   clinvla::DicomTags tags;
//   clinvla::Image frontal = clinvla::read_dicom("frontal.dcm", &tags);   // (H, W) grey in [0, 1]
//   clinvla::ViewRules rules = clinvla::ViewRules::load_default();
//   clinvla::ViewDecision d = rules.classify(tags.view_tags());          // frontal, "view_position", "PA"
//
// Errors are thrown as clinvla::Error (clinvla/index.hpp) whose message names the input and the
// fix: Invalid (bad argument, image too small or too large), IO (file cannot be read), Format
// (not DICOM, corrupt, truncated, not one grey frame, invalid display attributes), Unsupported
// (compressed transfer syntax: decode in the PACS, e.g. Orthanc's decoder, or convert it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "clinvla/index.hpp"

namespace clinvla {

// Size limits: the smallest side the model accepts (Python's to_unit_float), the largest side,
// and Python's MAX_IMAGE_PIXELS (clinvla_engine.data.io): checked from the header, before any
// pixel is decoded, so memory stays bounded whatever a file claims.
constexpr int32_t kMinImageSide = 8;
constexpr int32_t kMaxImageSide = 16384;
constexpr int64_t kMaxImagePixels = 50'000'000;

// Display grey, float32 row-major (height, width), bright = dense, values in [0, 1].
class Image {
 public:
  Image() = default;
  Image(int32_t width, int32_t height);  // zero-filled; checks the size limits
  int32_t width() const { return width_; }
  int32_t height() const { return height_; }
  const float* data() const { return pixels_.data(); }
  float* data() { return pixels_.data(); }
  std::size_t size() const { return pixels_.size(); }
  bool empty() const { return pixels_.empty(); }

 private:
  int32_t width_ = 0, height_ = 0;
  std::vector<float> pixels_;
};

enum class PixelType : int32_t { U8 = 0, U16 = 1, F32 = 2 };  // = clinvla_pixel_type

// A view of caller-owned pixels: one grey plane, row_stride_bytes >= width * pixel size.
struct PixelsView {
  const void* data = nullptr;
  int32_t width = 0;
  int32_t height = 0;
  int64_t row_stride_bytes = 0;
  PixelType type = PixelType::U16;
};

// Decoded pixels -> [0, 1] grey as Python's to_unit_float: U8 / 255, U16 / 65535, F32 as is
// (non-finite values are refused). At least kMinImageSide on each side.
Image image_from_pixels(const PixelsView& pixels);

// What the view rules read (values as stored, multi-values backslash-separated).
struct ViewTags {
  std::string modality;
  std::string view_position;
  std::string view_code_scheme;   // ViewCodeSequence[0].CodingSchemeDesignator
  std::string view_code_value;    // ViewCodeSequence[0].CodeValue
  std::string view_code_meaning;  // ViewCodeSequence[0].CodeMeaning
  std::string patient_orientation;
};

// The tags a PACS integration needs from a DICOM file (empty strings when absent).
struct DicomTags {
  std::string modality, view_position, view_code_scheme, view_code_value, view_code_meaning;
  std::string patient_orientation, study_instance_uid, series_instance_uid, sop_instance_uid;
  std::string transfer_syntax_uid;
  int32_t rows = 0, columns = 0;
  ViewTags view_tags() const {
    return ViewTags{modality, view_position, view_code_scheme, view_code_value, view_code_meaning,
                    patient_orientation};
  }
};

// Decodes one uncompressed grey DICOM file (explicit / implicit VR little endian, explicit big
// endian, deflated explicit little endian) to display grey exactly as load_image does: modality
// LUT or rescale, VOI LUT or window (pydicom's apply_voi_lut semantics, the first of several
// windows), MONOCHROME1 inverted, normalised to [0, 1] over the display range. tags: filled in
// when not null.
Image read_dicom(const std::string& path, DicomTags* tags = nullptr);
// The same from a file already in memory (name: used in messages only).
Image read_dicom_buffer(const uint8_t* data, std::size_t size, const std::string& name, DicomTags* tags = nullptr);

// Stored pixel values (U8 or U16 as a PACS decoder gives them; signed images as their 16-bit
// two's complement) -> display grey with the same conventions as read_dicom. attributes_json: a
// JSON object of DICOM keywords to values in Orthanc's "simplified" form (strings, multi-values
// backslash-separated, sequences as arrays of objects), e.g. {"PhotometricInterpretation":
// "MONOCHROME2", "BitsStored": "12", "PixelRepresentation": "0", "RescaleSlope": "1", ...}.
Image display_from_stored(const PixelsView& stored, const std::string& attributes_json);

// ---- view rules (clinvla_engine/data/view_rules.json) -----------------------------------------
enum class View : int32_t { None = 0, Frontal = 1, Lateral = 2 };  // = clinvla_view

struct ViewDecision {
  View view = View::None;
  std::string rule;   // view_position | view_code | patient_orientation | modality | none
  std::string label;  // PA, AP, FRONTAL, LL, RL, LATERAL, XTABLE LATERAL; empty for none
};

class ViewRules {
 public:
  // The rules file Python reads (schema_version 1); Format error naming the file when invalid.
  static ViewRules load(const std::string& path);
  // The installed file: $CLINVLA_VIEW_RULES, else the path compiled in as
  // CLINVLA_DEFAULT_VIEW_RULES, else share/clinvla/view_rules.json beside the library.
  static ViewRules load_default();
  static std::string default_path();  // the file load_default() would read (Invalid if none)

  ViewDecision classify(const ViewTags& tags) const;
  // A tag value as the rules compare it: upper case, the "as_space" characters as spaces,
  // whitespace runs collapsed, trimmed (Python's views.normalise on a string).
  std::string normalise(const std::string& value) const;
  const std::string& path() const { return path_; }

  struct Impl;

 private:
  std::string path_;
  std::shared_ptr<const Impl> impl_;
};

const char* view_name(View view);  // "frontal" | "lateral" | "none"

}  // namespace clinvla
