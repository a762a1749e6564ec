/* libclinvla: the ClinVLA engine, tokenizer, DICOM reading and view rules as a C API.
 *
 * Same conventions as clinvla.h (which this header includes): every function returns CLINVLA_OK (0)
 * or an error status, clinvla_last_error() then gives a message for the calling thread; no C++
 * exception crosses this boundary; handles are opaque and freed by their own *_free function
 * (free(NULL) is a no-op); buffers are caller-owned.
 *
 *   clinvla_engine* engine = NULL;
 *   if (clinvla_engine_load("/srv/engine", "cpu", &engine) != CLINVLA_OK) { puts(clinvla_last_error()); return 1; }
 *   clinvla_image* frontal = NULL;
 *   clinvla_dicom_read_image("frontal.dcm", &frontal, NULL);
 *   float emb[512];                           // clinvla_engine_dim(engine) floats
 *   clinvla_engine_embed_study(engine, frontal, NULL, emb);
 *   clinvla_engine_embed_text(engine, "small right pleural effusion", emb);
 *   clinvla_image_free(frontal); clinvla_engine_free(engine);
 */
#ifndef CLINVLA_ENGINE_H_
#define CLINVLA_ENGINE_H_

#include "clinvla/clinvla.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- images ------------------------------------------------------------------------------- */
typedef enum clinvla_pixel_type {
  CLINVLA_PIXEL_U8 = 0,  /* 0..255 -> grey value / 255 */
  CLINVLA_PIXEL_U16 = 1, /* 0..65535 -> grey value / 65535 (as Python's to_unit_float) */
  CLINVLA_PIXEL_F32 = 2  /* already display grey in [0, 1] (bright = dense) */
} clinvla_pixel_type;

/* A view of caller-owned decoded pixels: one grey plane, row_stride_bytes >= width * pixel size. */
typedef struct clinvla_pixels {
  const void* data;
  int32_t width;
  int32_t height;
  int64_t row_stride_bytes;
  clinvla_pixel_type type;
} clinvla_pixels;

/* An image owned by the library (display grey in [0, 1], float32, row-major). */
typedef struct clinvla_image clinvla_image;
CLINVLA_API clinvla_status clinvla_image_from_pixels(const clinvla_pixels* pixels, clinvla_image** out);
CLINVLA_API void clinvla_image_free(clinvla_image* image);
CLINVLA_API int32_t clinvla_image_width(const clinvla_image* image);
CLINVLA_API int32_t clinvla_image_height(const clinvla_image* image);
CLINVLA_API const float* clinvla_image_data(const clinvla_image* image);

/* ---- DICOM (uncompressed transfer syntaxes; compressed ones are CLINVLA_ERR_UNSUPPORTED) ------ */
/* The tags the view rules read, as strings (empty when absent). */
typedef struct clinvla_dicom_tags {
  char modality[17];
  char view_position[65];
  char view_code_meaning[129];     /* ViewCodeSequence[0].CodeMeaning */
  char patient_orientation[65];
  char study_instance_uid[65];
  char series_instance_uid[65];
  char sop_instance_uid[65];
  char view_code_scheme[17];       /* ViewCodeSequence[0].CodingSchemeDesignator */
  char view_code_value[17];        /* ViewCodeSequence[0].CodeValue */
} clinvla_dicom_tags;
/* The struct has the view_code_scheme / view_code_value fields (the view rules read them when the
 * code meaning is blank or unknown). */
#define CLINVLA_DICOM_TAGS_VIEW_CODE 1

/* Decodes a DICOM file to display grey exactly as clinvla_engine.data.io.load_image does (modality
 * LUT, VOI LUT or window, MONOCHROME1 inversion). tags: NULL or filled in. */
CLINVLA_API clinvla_status clinvla_dicom_read_image(const char* path, clinvla_image** out, clinvla_dicom_tags* tags);
/* Stored pixel values (as a PACS decoder such as Orthanc's gives them) -> display grey, with the
 * same conventions; the attributes come as a JSON object of DICOM keywords to values in the DICOM
 * JSON model's "simplified" form Orthanc uses, e.g. {"RescaleSlope":"1","WindowCenter":"2048",
 * "PhotometricInterpretation":"MONOCHROME2","BitsStored":"12",...}. */
CLINVLA_API clinvla_status clinvla_display_from_stored(const clinvla_pixels* stored, const char* attributes_json,
                                                       clinvla_image** out);

/* ---- view rules (clinvla_engine/data/view_rules.json, the same file Python reads) ------------- */
typedef enum clinvla_view { CLINVLA_VIEW_NONE = 0, CLINVLA_VIEW_FRONTAL = 1, CLINVLA_VIEW_LATERAL = 2 } clinvla_view;
typedef struct clinvla_view_rules clinvla_view_rules;
/* path NULL: the file installed with the library. */
CLINVLA_API clinvla_status clinvla_view_rules_load(const char* path, clinvla_view_rules** out);
CLINVLA_API void clinvla_view_rules_free(clinvla_view_rules* rules);
/* view: the decision; label (may be NULL, else >= 32 bytes): e.g. "PA", "LL"; rule (may be NULL,
 * else >= 32 bytes): "view_position" | "view_code" | "patient_orientation" | "modality" | "none". */
CLINVLA_API clinvla_status clinvla_view_classify(const clinvla_view_rules* rules, const clinvla_dicom_tags* tags,
                                                 clinvla_view* view, char* label, char* rule);

/* ---- tokenizer (WordPiece, equal to the Hugging Face BERT tokenizer of the bundle's vocab) ---- */
typedef struct clinvla_tokenizer clinvla_tokenizer;
CLINVLA_API clinvla_status clinvla_tokenizer_load(const char* vocab_path, int lowercase, int32_t max_length,
                                                  clinvla_tokenizer** out);
CLINVLA_API void clinvla_tokenizer_free(clinvla_tokenizer* tokenizer);
/* ids: capacity max_ids; n_ids receives the count ([CLS] ... [SEP], truncated to max_length). */
CLINVLA_API clinvla_status clinvla_tokenize(const clinvla_tokenizer* tokenizer, const char* utf8_text,
                                            int32_t* ids, int64_t max_ids, int64_t* n_ids);

/* ---- engine (an AOTInductor bundle through libtorch; a TensorRT plan when built with TensorRT) - */
typedef struct clinvla_engine clinvla_engine;
/* device: "cpu", "cuda", "cuda:N" or NULL (the bundle's). Verifies the manifest's SHA-256 of every
 * file like the Python runtime and refuses a tampered or incomplete bundle, a missing, extra or
 * linked file, or one built with another clinvla_engine / torch release (CLINVLA_ERR_FORMAT, the
 * message names the file). Bundles of other backends (onnxruntime, openvino, compile; tensorrt
 * where libclinvla was built without TensorRT) are CLINVLA_ERR_UNSUPPORTED: build the engine with
 * clinvla-build-engine --backend aoti. A device other than the one it was compiled for: INVALID. */
CLINVLA_API clinvla_status clinvla_engine_load(const char* bundle_dir, const char* device, clinvla_engine** out);
CLINVLA_API void clinvla_engine_free(clinvla_engine* engine);
CLINVLA_API int64_t clinvla_engine_dim(const clinvla_engine* engine);        /* global embedding size */
CLINVLA_API int32_t clinvla_engine_image_size(const clinvla_engine* engine); /* model input side */
CLINVLA_API const clinvla_tokenizer* clinvla_engine_tokenizer(const clinvla_engine* engine);
/* lateral may be NULL. out: clinvla_engine_dim floats, L2-normalised. Thread-safe. */
CLINVLA_API clinvla_status clinvla_engine_embed_study(clinvla_engine* engine, const clinvla_image* frontal,
                                                      const clinvla_image* lateral, float* out);
/* n studies at once: frontal[i], lateral[i] (NULL entries for missing laterals); out: (n, dim). */
CLINVLA_API clinvla_status clinvla_engine_embed_studies(clinvla_engine* engine, int64_t n,
                                                        const clinvla_image* const* frontal,
                                                        const clinvla_image* const* lateral, float* out);
/* utf8_report: one report (section headers and extra whitespace are dropped as in Python's
 * report_text); out: clinvla_engine_dim floats, L2-normalised. Thread-safe. */
CLINVLA_API clinvla_status clinvla_engine_embed_text(clinvla_engine* engine, const char* utf8_report, float* out);
/* n reports at once, padded together as Python's Engine.embed_texts pads a list; out: (n, dim). */
CLINVLA_API clinvla_status clinvla_engine_embed_texts(clinvla_engine* engine, int64_t n,
                                                      const char* const* utf8_reports, float* out);
/* Already tokenized texts: ids[i] holds n_ids[i] token ids ([CLS] ... [SEP], e.g. from
 * clinvla_tokenize); cut to the bundle's max_text_len as Python cuts them; out: (n, dim). */
CLINVLA_API clinvla_status clinvla_engine_embed_tokens(clinvla_engine* engine, int64_t n,
                                                       const int32_t* const* ids, const int64_t* n_ids, float* out);
/* Caller-owned decoded pixels straight in (no clinvla_image copy): U8 / U16 / F32 as
 * clinvla_pixel_type says (Python's to_unit_float); lateral may be NULL. out: dim floats. */
CLINVLA_API clinvla_status clinvla_engine_embed_study_pixels(clinvla_engine* engine, const clinvla_pixels* frontal,
                                                             const clinvla_pixels* lateral, float* out);
/* The bundle this engine was loaded from: its backend ("aoti", "tensorrt") and device ("cpu", "cuda:0"). */
CLINVLA_API const char* clinvla_engine_backend(const clinvla_engine* engine);
CLINVLA_API const char* clinvla_engine_device(const clinvla_engine* engine);

/* Python's clinvla_engine.data.dataset.report_text: section headers ("FINDINGS:") removed,
 * whitespace runs collapsed. out: capacity bytes (NUL-terminated); n_bytes (may be NULL) receives
 * the length without the NUL; CLINVLA_ERR_INVALID when capacity is too small (n_bytes still set). */
CLINVLA_API clinvla_status clinvla_report_text(const char* utf8_report, char* out, int64_t capacity, int64_t* n_bytes);

#ifdef __cplusplus
}
#endif

#endif /* CLINVLA_ENGINE_H_ */
