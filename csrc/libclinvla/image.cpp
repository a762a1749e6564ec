// clinvla::Image, decoded pixels -> [0, 1] grey (Python's to_unit_float), and the C API of the
// images, DICOM and view rules sections of clinvla/engine.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <sstream>
#include <string>
#include <utility>

#include "clinvla/dicom.hpp"
#include "internal.hpp"  // csrc/core: detail::cat, detail::fail
#include "clinvla/engine.h"

namespace clinvla {
namespace detail {
// The per-thread message behind clinvla_last_error(), defined in csrc/core/c_api.cpp.
void set_last_error(const std::string& message);
}  // namespace detail

namespace {
using detail::cat;
using detail::fail;

const char* type_name(PixelType t) {
  switch (t) {
    case PixelType::U8: return "U8";
    case PixelType::U16: return "U16";
    case PixelType::F32: return "F32";
  }
  return "unknown";
}
}  // namespace

Image::Image(int32_t width, int32_t height) {
  if (width < kMinImageSide || height < kMinImageSide) {
    fail(ErrorCode::Invalid, "image of (", height, ", ", width, ") pixels is too small to be a radiograph (at least ",
         kMinImageSide, " x ", kMinImageSide, ")");
  }
  if (width > kMaxImageSide || height > kMaxImageSide || int64_t(width) * height > kMaxImagePixels) {
    fail(ErrorCode::Invalid, "image of ", width, " x ", height, " pixels is over the limit of ", kMaxImageSide,
         " a side and ", kMaxImagePixels, " pixels");
  }
  width_ = width;
  height_ = height;
  pixels_.assign(std::size_t(width) * std::size_t(height), 0.0f);
}

Image image_from_pixels(const PixelsView& p) {
  if (!p.data) fail(ErrorCode::Invalid, "pixels: data is a null pointer");
  int64_t size;
  switch (p.type) {
    case PixelType::U8: size = 1; break;
    case PixelType::U16: size = 2; break;
    case PixelType::F32: size = 4; break;
    default: fail(ErrorCode::Invalid, "pixels: unknown pixel type ", int(p.type), " (expected U8, U16 or F32)");
  }
  if (p.row_stride_bytes < int64_t(p.width) * size) {
    fail(ErrorCode::Invalid, "pixels: row_stride_bytes ", p.row_stride_bytes, " is less than width ", p.width, " x ",
         size, " bytes (", type_name(p.type), ")");
  }
  Image img(p.width, p.height);
  const uint8_t* base = static_cast<const uint8_t*>(p.data);
  float* out = img.data();
  for (int32_t y = 0; y < p.height; ++y) {
    const uint8_t* row = base + int64_t(y) * p.row_stride_bytes;
    float* o = out + int64_t(y) * p.width;
    if (p.type == PixelType::U8) {
      for (int32_t x = 0; x < p.width; ++x) o[x] = float(row[x]) / 255.0f;
    } else if (p.type == PixelType::U16) {
      for (int32_t x = 0; x < p.width; ++x) {
        uint16_t v;
        std::memcpy(&v, row + 2 * x, 2);
        o[x] = float(v) / 65535.0f;
      }
    } else {
      std::memcpy(o, row, std::size_t(p.width) * 4);
      for (int32_t x = 0; x < p.width; ++x) {
        if (!std::isfinite(o[x])) {
          fail(ErrorCode::Invalid, "pixels: F32 value at row ", y, ", column ", x, " is not finite (", o[x], ")");
        }
      }
    }
  }
  return img;
}

}  // namespace clinvla

struct clinvla_image {
  clinvla::Image image;
};

struct clinvla_view_rules {
  clinvla::ViewRules rules;
};

namespace {

template <typename F>
clinvla_status guarded(F&& f) {
  try {
    f();
    clinvla::detail::set_last_error("");
    return CLINVLA_OK;
  } catch (const clinvla::Error& e) {
    clinvla::detail::set_last_error(e.what());
    return clinvla_status(int(e.code()));
  } catch (const std::bad_alloc&) {
    clinvla::detail::set_last_error("out of memory");
    return CLINVLA_ERR_NOMEM;
  } catch (const std::exception& e) {
    clinvla::detail::set_last_error(e.what());
    return CLINVLA_ERR_INTERNAL;
  } catch (...) {
    clinvla::detail::set_last_error("unknown error");
    return CLINVLA_ERR_INTERNAL;
  }
}

clinvla_status null_arg(const char* what) {
  clinvla::detail::set_last_error(std::string(what) + " is a null pointer");
  return CLINVLA_ERR_INVALID;
}

clinvla::PixelsView to_view(const clinvla_pixels* p) {
  clinvla::PixelsView v;
  v.data = p->data;
  v.width = p->width;
  v.height = p->height;
  v.row_stride_bytes = p->row_stride_bytes;
  v.type = clinvla::PixelType(p->type);
  return v;
}

template <std::size_t N>
void copy_field(char (&dst)[N], const std::string& src) {
  const std::size_t n = std::min(src.size(), N - 1);
  std::memcpy(dst, src.data(), n);
  dst[n] = '\0';
}

std::string field(const char* s, std::size_t n) { return std::string(s, strnlen(s, n)); }

}  // namespace

extern "C" {

clinvla_status clinvla_image_from_pixels(const clinvla_pixels* pixels, clinvla_image** out) {
  if (!out) return null_arg("out");
  *out = nullptr;
  if (!pixels) return null_arg("pixels");
  return guarded([&] { *out = new clinvla_image{clinvla::image_from_pixels(to_view(pixels))}; });
}

void clinvla_image_free(clinvla_image* image) { delete image; }
int32_t clinvla_image_width(const clinvla_image* image) { return image ? image->image.width() : 0; }
int32_t clinvla_image_height(const clinvla_image* image) { return image ? image->image.height() : 0; }
const float* clinvla_image_data(const clinvla_image* image) { return image ? image->image.data() : nullptr; }

clinvla_status clinvla_dicom_read_image(const char* path, clinvla_image** out, clinvla_dicom_tags* tags) {
  if (!out) return null_arg("out");
  *out = nullptr;
  if (!path) return null_arg("path");
  if (tags) std::memset(tags, 0, sizeof *tags);
  return guarded([&] {
    clinvla::DicomTags t;
    clinvla::Image img;
    try {
      img = clinvla::read_dicom(path, &t);
    } catch (...) {
      // the tags read before the error still help the caller log what the file was
      if (tags) {
        copy_field(tags->modality, t.modality);
        copy_field(tags->sop_instance_uid, t.sop_instance_uid);
        copy_field(tags->study_instance_uid, t.study_instance_uid);
        copy_field(tags->series_instance_uid, t.series_instance_uid);
      }
      throw;
    }
    if (tags) {
      copy_field(tags->modality, t.modality);
      copy_field(tags->view_position, t.view_position);
      copy_field(tags->view_code_meaning, t.view_code_meaning);
#ifdef CLINVLA_DICOM_TAGS_VIEW_CODE
      copy_field(tags->view_code_scheme, t.view_code_scheme);
      copy_field(tags->view_code_value, t.view_code_value);
#endif
      copy_field(tags->patient_orientation, t.patient_orientation);
      copy_field(tags->study_instance_uid, t.study_instance_uid);
      copy_field(tags->series_instance_uid, t.series_instance_uid);
      copy_field(tags->sop_instance_uid, t.sop_instance_uid);
    }
    *out = new clinvla_image{std::move(img)};
  });
}

clinvla_status clinvla_display_from_stored(const clinvla_pixels* stored, const char* attributes_json,
                                           clinvla_image** out) {
  if (!out) return null_arg("out");
  *out = nullptr;
  if (!stored) return null_arg("stored");
  if (!attributes_json) return null_arg("attributes_json");
  return guarded([&] { *out = new clinvla_image{clinvla::display_from_stored(to_view(stored), attributes_json)}; });
}

clinvla_status clinvla_view_rules_load(const char* path, clinvla_view_rules** out) {
  if (!out) return null_arg("out");
  *out = nullptr;
  return guarded([&] {
    *out = new clinvla_view_rules{path ? clinvla::ViewRules::load(path) : clinvla::ViewRules::load_default()};
  });
}

void clinvla_view_rules_free(clinvla_view_rules* rules) { delete rules; }

clinvla_status clinvla_view_classify(const clinvla_view_rules* rules, const clinvla_dicom_tags* tags,
                                     clinvla_view* view, char* label, char* rule) {
  if (!rules) return null_arg("rules");
  if (!tags) return null_arg("tags");
  if (!view) return null_arg("view");
  return guarded([&] {
    clinvla::ViewTags t;
    t.modality = field(tags->modality, sizeof tags->modality);
    t.view_position = field(tags->view_position, sizeof tags->view_position);
    t.view_code_meaning = field(tags->view_code_meaning, sizeof tags->view_code_meaning);
#ifdef CLINVLA_DICOM_TAGS_VIEW_CODE
    t.view_code_scheme = field(tags->view_code_scheme, sizeof tags->view_code_scheme);
    t.view_code_value = field(tags->view_code_value, sizeof tags->view_code_value);
#endif
    t.patient_orientation = field(tags->patient_orientation, sizeof tags->patient_orientation);
    const clinvla::ViewDecision d = rules->rules.classify(t);
    *view = clinvla_view(int(d.view));
    if (label) {
      const std::size_t n = std::min<std::size_t>(d.label.size(), 31);
      std::memcpy(label, d.label.data(), n);
      label[n] = '\0';
    }
    if (rule) {
      const std::size_t n = std::min<std::size_t>(d.rule.size(), 31);
      std::memcpy(rule, d.rule.data(), n);
      rule[n] = '\0';
    }
  });
}

}  // extern "C"
