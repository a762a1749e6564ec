// The engine functions of the C API (clinvla/engine.h) over clinvla::Engine: opaque handles,
// status codes plus the per-thread last-error string, every pointer checked, no exception out.
#include <cstring>
#include <string>
#include <vector>

#include "clinvla/engine.h"
#include "clinvla/engine.hpp"
#include "../core/internal.hpp"
#include "error.hpp"

struct clinvla_engine {
  clinvla::Engine engine;
  std::string device;
};

namespace {

using clinvla::ErrorCode;
using clinvla::detail::fail;
using clinvla::detail::guarded_call;
using clinvla::detail::null_argument;

// clinvla_pixels -> float grey in [0, 1], as Python's to_unit_float (uint8 / 255, uint16 / 65535).
std::vector<float> unit_float(const clinvla_pixels& p, const char* what) {
  if (!p.data) fail(ErrorCode::Invalid, what, "->data is a null pointer");
  if (p.width < 1 || p.height < 1)
    fail(ErrorCode::Invalid, what, " must have a positive size, got ", p.width, " x ", p.height);
  if (int64_t(p.width) * p.height > (int64_t(1) << 28))
    fail(ErrorCode::Invalid, what, " of ", p.width, " x ", p.height, " pixels is larger than 2^28 pixels");
  size_t px = 0;
  switch (p.type) {
    case CLINVLA_PIXEL_U8: px = 1; break;
    case CLINVLA_PIXEL_U16: px = 2; break;
    case CLINVLA_PIXEL_F32: px = 4; break;
    default: fail(ErrorCode::Invalid, what, "->type must be CLINVLA_PIXEL_U8, _U16 or _F32, got ", int(p.type));
  }
  if (p.row_stride_bytes < int64_t(p.width) * int64_t(px))
    fail(ErrorCode::Invalid, what, "->row_stride_bytes must be >= width * ", px, " = ", int64_t(p.width) * px,
         ", got ", p.row_stride_bytes);
  std::vector<float> out(size_t(p.width) * size_t(p.height));
  for (int32_t y = 0; y < p.height; ++y) {
    const auto* row = static_cast<const uint8_t*>(p.data) + y * p.row_stride_bytes;
    float* dst = out.data() + size_t(y) * size_t(p.width);
    for (int32_t x = 0; x < p.width; ++x) {
      if (p.type == CLINVLA_PIXEL_U8) dst[x] = float(row[x]) / 255.0f;
      else if (p.type == CLINVLA_PIXEL_U16) {
        uint16_t v;
        std::memcpy(&v, row + 2 * x, 2);
        dst[x] = float(v) / 65535.0f;
      } else {
        std::memcpy(dst + x, row + 4 * x, 4);
      }
    }
  }
  return out;
}

#ifdef CLINVLA_HAVE_IMAGES
clinvla::GreyImage grey_of(const clinvla_image* image) {
  return {clinvla_image_data(image), clinvla_image_height(image), clinvla_image_width(image), 0};
}
#endif

}  // namespace

extern "C" {

clinvla_status clinvla_engine_load(const char* bundle_dir, const char* device, clinvla_engine** out) {
  if (!out) return null_argument("clinvla_engine_load", "out");
  *out = nullptr;
  if (!bundle_dir) return null_argument("clinvla_engine_load", "bundle_dir");
  return guarded_call([&] {
    clinvla::Engine::Options opt;
    if (device) opt.device = device;
    clinvla::Engine engine = clinvla::Engine::load(bundle_dir, opt);
    std::string dev = engine.device();
    *out = new clinvla_engine{std::move(engine), std::move(dev)};
  });
}

void clinvla_engine_free(clinvla_engine* engine) { delete engine; }
int64_t clinvla_engine_dim(const clinvla_engine* engine) { return engine ? engine->engine.dim() : 0; }
int32_t clinvla_engine_image_size(const clinvla_engine* engine) { return engine ? engine->engine.image_size() : 0; }
const clinvla_tokenizer* clinvla_engine_tokenizer(const clinvla_engine* engine) {
  return engine ? engine->engine.tokenizer_handle() : nullptr;
}
const char* clinvla_engine_backend(const clinvla_engine* engine) {
  return engine ? engine->engine.backend().c_str() : "";
}
const char* clinvla_engine_device(const clinvla_engine* engine) { return engine ? engine->device.c_str() : ""; }

clinvla_status clinvla_engine_embed_study(clinvla_engine* engine, const clinvla_image* frontal,
                                          const clinvla_image* lateral, float* out) {
  const clinvla_image* const f[1] = {frontal};
  const clinvla_image* const l[1] = {lateral};
  if (!engine) return null_argument("clinvla_engine_embed_study", "engine");
  if (!frontal) return null_argument("clinvla_engine_embed_study", "frontal");
  if (!out) return null_argument("clinvla_engine_embed_study", "out");
  return clinvla_engine_embed_studies(engine, 1, f, l, out);
}

clinvla_status clinvla_engine_embed_studies(clinvla_engine* engine, int64_t n, const clinvla_image* const* frontal,
                                            const clinvla_image* const* lateral, float* out) {
  if (!engine) return null_argument("clinvla_engine_embed_studies", "engine");
  if (!frontal) return null_argument("clinvla_engine_embed_studies", "frontal");
  if (!out) return null_argument("clinvla_engine_embed_studies", "out");
  return guarded_call([&] {
#ifdef CLINVLA_HAVE_IMAGES
    if (n < 1) fail(ErrorCode::Invalid, "clinvla_engine_embed_studies: n must be >= 1, got ", n);
    const size_t count = static_cast<size_t>(n);
    std::vector<clinvla::GreyImage> fs(count), ls(count);
    std::vector<const clinvla::GreyImage*> fp(count), lp(count, nullptr);
    for (int64_t i = 0; i < n; ++i) {
      if (!frontal[i]) fail(ErrorCode::Invalid, "clinvla_engine_embed_studies: frontal[", i, "] is a null pointer");
      fs[i] = grey_of(frontal[i]);
      fp[i] = &fs[i];
      if (lateral && lateral[i]) {
        ls[i] = grey_of(lateral[i]);
        lp[i] = &ls[i];
      }
    }
    engine->engine.embed_studies(n, fp.data(), lp.data(), out);
#else
    (void)n; (void)lateral;
    fail(ErrorCode::Unsupported, "this libclinvla was built without clinvla_image (csrc/libclinvla/dicom.cpp was "
         "missing at configure time); use clinvla_engine_embed_study_pixels or rebuild with make cpp");
#endif
  });
}

clinvla_status clinvla_engine_embed_study_pixels(clinvla_engine* engine, const clinvla_pixels* frontal,
                                                 const clinvla_pixels* lateral, float* out) {
  if (!engine) return null_argument("clinvla_engine_embed_study_pixels", "engine");
  if (!frontal) return null_argument("clinvla_engine_embed_study_pixels", "frontal");
  if (!out) return null_argument("clinvla_engine_embed_study_pixels", "out");
  return guarded_call([&] {
    std::vector<float> f = unit_float(*frontal, "frontal"), l;
    clinvla::GreyImage fi{f.data(), frontal->height, frontal->width, 0}, li;
    const clinvla::GreyImage* fp = &fi;
    const clinvla::GreyImage* lp = nullptr;
    if (lateral) {
      l = unit_float(*lateral, "lateral");
      li = {l.data(), lateral->height, lateral->width, 0};
      lp = &li;
    }
    engine->engine.embed_studies(1, &fp, &lp, out);
  });
}

clinvla_status clinvla_engine_embed_text(clinvla_engine* engine, const char* utf8_report, float* out) {
  if (!engine) return null_argument("clinvla_engine_embed_text", "engine");
  if (!utf8_report) return null_argument("clinvla_engine_embed_text", "utf8_report");
  if (!out) return null_argument("clinvla_engine_embed_text", "out");
  return guarded_call([&] { engine->engine.embed_texts({std::string(utf8_report)}, out); });
}

clinvla_status clinvla_engine_embed_texts(clinvla_engine* engine, int64_t n, const char* const* utf8_reports,
                                          float* out) {
  if (!engine) return null_argument("clinvla_engine_embed_texts", "engine");
  if (!utf8_reports) return null_argument("clinvla_engine_embed_texts", "utf8_reports");
  if (!out) return null_argument("clinvla_engine_embed_texts", "out");
  return guarded_call([&] {
    if (n < 1) fail(ErrorCode::Invalid, "clinvla_engine_embed_texts: n must be >= 1, got ", n);
    std::vector<std::string> texts;
    for (int64_t i = 0; i < n; ++i) {
      if (!utf8_reports[i]) fail(ErrorCode::Invalid, "clinvla_engine_embed_texts: utf8_reports[", i, "] is a null pointer");
      texts.emplace_back(utf8_reports[i]);
    }
    engine->engine.embed_texts(texts, out);
  });
}

clinvla_status clinvla_engine_embed_tokens(clinvla_engine* engine, int64_t n, const int32_t* const* ids,
                                           const int64_t* n_ids, float* out) {
  if (!engine) return null_argument("clinvla_engine_embed_tokens", "engine");
  if (!ids) return null_argument("clinvla_engine_embed_tokens", "ids");
  if (!n_ids) return null_argument("clinvla_engine_embed_tokens", "n_ids");
  if (!out) return null_argument("clinvla_engine_embed_tokens", "out");
  return guarded_call([&] {
    if (n < 1) fail(ErrorCode::Invalid, "clinvla_engine_embed_tokens: n must be >= 1, got ", n);
    std::vector<std::vector<int64_t>> seqs(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      if (!ids[i]) fail(ErrorCode::Invalid, "clinvla_engine_embed_tokens: ids[", i, "] is a null pointer");
      if (n_ids[i] < 2 || n_ids[i] > 65536)
        fail(ErrorCode::Invalid, "clinvla_engine_embed_tokens: n_ids[", i, "] must be in 2..65536, got ", n_ids[i]);
      seqs[i].assign(ids[i], ids[i] + n_ids[i]);
    }
    engine->engine.embed_token_ids(seqs, out);
  });
}

clinvla_status clinvla_report_text(const char* utf8_report, char* out, int64_t capacity, int64_t* n_bytes) {
  if (!utf8_report) return null_argument("clinvla_report_text", "utf8_report");
  if (!out) return null_argument("clinvla_report_text", "out");
  return guarded_call([&] {
    const std::string clean = clinvla::report_text(utf8_report);
    if (n_bytes) *n_bytes = int64_t(clean.size());
    if (capacity < int64_t(clean.size()) + 1)
      fail(ErrorCode::Invalid, "clinvla_report_text: out holds ", capacity, " bytes, the text needs ", clean.size() + 1);
    std::memcpy(out, clean.c_str(), clean.size() + 1);
  });
}

}  // extern "C"
