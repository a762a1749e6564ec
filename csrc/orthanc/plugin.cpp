// libclinvla_orthanc.so: the ClinVLA Orthanc plugin.
//
// Orthanc's callbacks only queue work (a study id); worker threads list the study through the REST
// API, pick a frontal (+ lateral) CR/DX image with the shared view rules, decode it with Orthanc's
// decoder (so the GDCM plugin's codecs apply), turn stored values into display grey, embed with
// libclinvla and add the vector to the persistent index (study_index.hpp). REST routes search it.
// Every entry point from Orthanc catches everything: the plugin never takes Orthanc down.
//
// Configuration (Orthanc's JSON, section "ClinVLA"):
//   EngineDirectory  engine bundle folder (required)
//   IndexDirectory   where the index lives (required; one Orthanc per folder)
//   WorkerThreads    1..64, default 1
//   Device           "cpu" (default), "cuda", "cuda:N"
//   RequireEngine    true (default): Orthanc does not start when the plugin cannot; false: the
//                    plugin logs why and stays disabled, Orthanc serves normally
//   SnapshotEvery    log records between snapshots, default 1000
//   MaxPixels        larger images are skipped as "huge", default 50000000 (as Python's loader)
//   ViewRules        view_rules.json; default: libclinvla's installed copy, else the source tree's
//
// REST (JSON; bad parameters: 400 with {"error": "..."}; while disabled: 503 except status / ui):
//   GET  /clinvla/search?q=TEXT&k=10          studies by text: [{study, score, frontal_instance,
//                                              lateral_instance, tags}] best first
//   GET  /clinvla/studies/{id}/similar?k=10   studies like that one (its stored vector), itself excluded
//   GET  /clinvla/studies                     the indexed study ids
//   GET  /clinvla/studies/{id}                what the index holds for a study (instances, vector)
//   GET  /clinvla/status                      queue, indexed count, errors by kind, last errors, engine
//   POST /clinvla/reindex                     empty body: every study; or a JSON array of study ids
//   GET  /clinvla/ui                          a search page (thumbnails from /instances/{id}/preview)
#include <orthanc/OrthancCPlugin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "clinvla/clinvla.h"
#include "clinvla/engine.h"
#include "frame_check.hpp"
#include "study_index.hpp"
#include "ui_page.hpp"
#include "views.hpp"
#include "work_queue.hpp"

#ifndef CLINVLA_ORTHANC_VIEW_RULES
#define CLINVLA_ORTHANC_VIEW_RULES ""
#endif
#ifndef CLINVLA_ORTHANC_VIEW_RULES_INSTALLED
#define CLINVLA_ORTHANC_VIEW_RULES_INSTALLED ""
#endif
#define CLINVLA_ORTHANC_VERSION "0.1.0"

using json = nlohmann::json;

namespace clinvla_orthanc {
namespace {

OrthancPluginContext* g_ctx = nullptr;

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void log_error(const std::string& m) { OrthancPluginLogError(g_ctx, ("ClinVLA: " + m).c_str()); }
void log_warning(const std::string& m) { OrthancPluginLogWarning(g_ctx, ("ClinVLA: " + m).c_str()); }
void log_info(const std::string& m) { OrthancPluginLogInfo(g_ctx, ("ClinVLA: " + m).c_str()); }

std::string clinvla_error(clinvla_status s) {
  const char* e = clinvla_last_error();
  return std::string(e && *e ? e : "no message") + " (status " + std::to_string(int(s)) + ")";
}

// An instance the plugin skips, and why ("kind" is what /clinvla/status counts).
struct BadInstance : std::runtime_error {
  BadInstance(std::string k, const std::string& m) : std::runtime_error(m), kind(std::move(k)) {}
  std::string kind;
};

// An HTTP answer other than 200, with its message.
struct HttpError : std::runtime_error {
  HttpError(uint16_t s, const std::string& m) : std::runtime_error(m), status(s) {}
  uint16_t status;
};

struct Config {
  std::string engine_dir, index_dir, device = "cpu", view_rules;
  int workers = 1;
  bool require_engine = true;
  int64_t snapshot_every = 1000;
  int64_t max_pixels = 50000000;
};

struct ErrorRecord {
  std::string time, kind, study, instance, message;
};

struct State {
  Config cfg;
  bool enabled = false;
  std::string disabled_reason = "not initialised";
  clinvla_engine* engine = nullptr;
  clinvla_view_rules* rules = nullptr;
  PickRanks ranks;
  std::string fingerprint;
  std::unique_ptr<StudyIndex> index;
  WorkQueue queue;
  std::vector<std::thread> workers;
  std::mutex stats_mu;
  std::map<std::string, int64_t> errors;   // bad instances / failures by kind
  std::map<std::string, int64_t> skipped;  // studies not indexed, by reason
  std::map<std::string, int64_t> ignored;  // instances without pixels (SR, PR, KO...), by modality
  std::deque<ErrorRecord> last_errors;
  int64_t indexed_this_run = 0, removed_this_run = 0;
  std::atomic<bool> stopping{false};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
};

State* g = nullptr;

std::string now_text() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void record_error(const std::string& kind, const std::string& study, const std::string& instance,
                  const std::string& message, bool is_bad_input) {
  const std::string where = "study " + study + (instance.empty() ? "" : ", instance " + instance);
  if (is_bad_input) log_warning(where + " skipped (" + kind + "): " + message);
  else log_error(where + " (" + kind + "): " + message);
  std::lock_guard<std::mutex> lock(g->stats_mu);
  ++g->errors[kind];
  g->last_errors.push_back(ErrorRecord{now_text(), kind, study, instance, message});
  while (g->last_errors.size() > 20) g->last_errors.pop_front();
}

void record_skip(const std::string& reason, const std::string& study, const std::string& message) {
  log_info("study " + study + " not indexed (" + reason + "): " + message);
  std::lock_guard<std::mutex> lock(g->stats_mu);
  ++g->skipped[reason];
}

// ---- Orthanc's REST API from the plugin ---------------------------------------------------------
struct Buffer {
  OrthancPluginMemoryBuffer b{nullptr, 0};
  ~Buffer() {
    if (b.data) OrthancPluginFreeMemoryBuffer(g_ctx, &b);
  }
};

// false with *code set when Orthanc answers an error (UnknownResource: 404).
bool rest_get(const std::string& uri, std::string* body, OrthancPluginErrorCode* code) {
  Buffer buf;
  const OrthancPluginErrorCode c = OrthancPluginRestApiGet(g_ctx, &buf.b, uri.c_str());
  if (code) *code = c;
  if (c != OrthancPluginErrorCode_Success) return false;
  body->assign(static_cast<const char*>(buf.b.data), buf.b.size);
  return true;
}

bool rest_get_json(const std::string& uri, json* out, OrthancPluginErrorCode* code) {
  std::string body;
  if (!rest_get(uri, &body, code)) return false;
  *out = json::parse(body);
  return true;
}

std::string describe(OrthancPluginErrorCode c) {
  const char* d = OrthancPluginGetErrorDescription(g_ctx, c);
  return std::string(d ? d : "error") + " (Orthanc error " + std::to_string(int(c)) + ")";
}

std::string str_of(const json& tags, const char* key) {
  auto it = tags.find(key);
  return it != tags.end() && it->is_string() ? it->get<std::string>() : std::string();
}

bool int_of(const json& tags, const char* key, int64_t* out) {
  const std::string s = str_of(tags, key);
  if (s.empty()) return false;
  try {
    size_t used = 0;
    const long long v = std::stoll(s, &used);
    while (used < s.size() && s[used] == ' ') ++used;
    if (used != s.size()) return false;
    *out = v;
    return true;
  } catch (...) {
    return false;
  }
}

std::string upper_trim(std::string s) {
  for (char& c : s) c = char(std::toupper(static_cast<unsigned char>(c)));
  const auto b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

template <size_t N>
void copy_tag(char (&dst)[N], const std::string& src) {
  const size_t n = std::min(src.size(), N - 1);
  std::memcpy(dst, src.data(), n);
  dst[n] = '\0';
}

// ---- one study ---------------------------------------------------------------------------------
struct ImageGuard {
  clinvla_image* p = nullptr;
  ~ImageGuard() { clinvla_image_free(p); }
};
struct OrthancImageGuard {
  OrthancPluginImage* p = nullptr;
  ~OrthancImageGuard() {
    if (p) OrthancPluginFreeImage(g_ctx, p);
  }
};

// Objects without pixels that accompany images in a study (DICOM modality defined terms).
bool non_image_modality(const std::string& m) {
  static const std::set<std::string> kinds = {"SR", "PR", "KO", "DOC", "REG", "RWV", "PLAN", "AU", "ECG", "HD", "FID", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE"};
  return kinds.count(m) > 0;
}

bool uncompressed_syntax(const std::string& ts) {
  return ts == "1.2.840.10008.1.2" || ts == "1.2.840.10008.1.2.1" || ts == "1.2.840.10008.1.2.2" ||
         ts == "1.2.840.10008.1.2.1.99";
}

// Decoded by Orthanc (its codecs and the decoder plugins'), then stored -> display grey.
clinvla_image* decode(const std::string& instance, const json& tags) {
  std::string ts;
  rest_get("/instances/" + instance + "/metadata/TransferSyntax", &ts, nullptr);
  if (frame_check_applies(ts)) {
    std::string raw;
    OrthancPluginErrorCode rc{};
    if (!rest_get("/instances/" + instance + "/frames/0/raw", &raw, &rc))
      throw BadInstance("corrupt", "Orthanc cannot read its first frame: " + describe(rc));
    const std::string why = check_compressed_frame(ts, reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
    if (!why.empty())
      throw BadInstance("corrupt", why + " (transfer syntax " + ts + "): not decoded, since Orthanc's decoders can abort "
                                         "the whole server on such data");
  }
  Buffer dicom;
  const OrthancPluginErrorCode c = OrthancPluginGetDicomForInstance(g_ctx, &dicom.b, instance.c_str());
  if (c != OrthancPluginErrorCode_Success) throw BadInstance("orthanc_api", "cannot read the file: " + describe(c));
  if (uncompressed_syntax(ts) && ts != "1.2.840.10008.1.2.1.99") {
    // Some decoders (GDCM's) pad missing pixel data with zeros; Python's loader refuses such a file.
    int64_t rows = 0, columns = 0, bits = 0;
    if (int_of(tags, "Rows", &rows) && int_of(tags, "Columns", &columns) && int_of(tags, "BitsAllocated", &bits) &&
        bits > 0 && int64_t(dicom.b.size) < rows * columns * ((bits + 7) / 8))
      throw BadInstance("corrupt", "the file (" + std::to_string(dicom.b.size) + " bytes) is shorter than its pixel data (" +
                                       std::to_string(columns) + "x" + std::to_string(rows) + ", " + std::to_string(bits) +
                                       " bits): truncated");
  }
  OrthancImageGuard img;
  img.p = OrthancPluginDecodeDicomImage(g_ctx, dicom.b.data, dicom.b.size, 0);
  if (!img.p) {
    if (!ts.empty() && !uncompressed_syntax(ts))
      throw BadInstance("compressed_without_codec",
                        "Orthanc cannot decode its compressed pixel data (transfer syntax " + ts +
                            "): no codec for it in this Orthanc (load the GDCM plugin, libOrthancGdcm.so, "
                            "or convert the file to an uncompressed transfer syntax), or the data is damaged");
    throw BadInstance("corrupt", "Orthanc cannot decode its pixel data (transfer syntax " +
                                     (ts.empty() ? std::string("unknown") : ts) + "): the file is damaged");
  }
  const OrthancPluginPixelFormat format = OrthancPluginGetImagePixelFormat(g_ctx, img.p);
  const uint32_t w = OrthancPluginGetImageWidth(g_ctx, img.p), h = OrthancPluginGetImageHeight(g_ctx, img.p);
  const uint32_t pitch = OrthancPluginGetImagePitch(g_ctx, img.p);
  const void* data = OrthancPluginGetImageBuffer(g_ctx, img.p);
  if (w == 0 || h == 0 || !data) throw BadInstance("corrupt", "Orthanc decoded an empty image");
  if (int64_t(w) * int64_t(h) > g->cfg.max_pixels)
    throw BadInstance("huge", std::to_string(w) + "x" + std::to_string(h) + " pixels, more than ClinVLA.MaxPixels (" +
                                  std::to_string(g->cfg.max_pixels) + ")");
  clinvla_pixels px{};
  px.width = int32_t(w);
  px.height = int32_t(h);
  switch (format) {
    case OrthancPluginPixelFormat_Grayscale8:
      px.data = data, px.row_stride_bytes = pitch, px.type = CLINVLA_PIXEL_U8;
      break;
    case OrthancPluginPixelFormat_Grayscale16:
    case OrthancPluginPixelFormat_SignedGrayscale16:  // two's complement; PixelRepresentation says signed
      px.data = data, px.row_stride_bytes = pitch, px.type = CLINVLA_PIXEL_U16;
      break;
    case OrthancPluginPixelFormat_RGB24:
    case OrthancPluginPixelFormat_RGBA32:
    case OrthancPluginPixelFormat_RGB48:
    case OrthancPluginPixelFormat_BGRA32:
      throw BadInstance("colour", "Orthanc decoded it as a colour image (pixel format " + std::to_string(int(format)) +
                                      "): not a grey radiograph");
    default:
      throw BadInstance("unsupported_pixels", "Orthanc decoded it to pixel format " + std::to_string(int(format)) +
                                                  " (32/64-bit or float): radiographs are stored in 8 or 16 bits");
  }
  clinvla_image* out = nullptr;
  const clinvla_status s = clinvla_display_from_stored(&px, dump(tags).c_str(), &out);
  if (s != CLINVLA_OK) throw BadInstance("corrupt", "cannot convert its pixels to display grey: " + clinvla_error(s));
  return out;
}

void index_study(const std::string& study) {
  json series;
  OrthancPluginErrorCode code{};
  if (!rest_get_json("/studies/" + study + "/series", &series, &code)) {
    if (code == OrthancPluginErrorCode_UnknownResource) {  // deleted meanwhile
      if (g->index->remove(study)) log_info("study " + study + " no longer exists: removed from the index");
      return;
    }
    record_error("orthanc_api", study, "", "cannot list its series: " + describe(code), false);
    return;
  }
  std::vector<Candidate> candidates;
  std::vector<json> candidate_tags;
  for (const auto& s : series) {
    const std::string modality = upper_trim(str_of(s.value("MainDicomTags", json::object()), "Modality"));
    const auto instances = s.value("Instances", json::array());
    if (non_image_modality(modality)) {
      // Reports, presentation states, key-object notes... belong in a study: not an error.
      std::lock_guard<std::mutex> lock(g->stats_mu);
      g->ignored[modality] += int64_t(instances.size());
      continue;
    }
    if (!g->ranks.modality_allowed(modality)) {
      // Not a radiograph: the whole series is skipped without reading its (possibly many) instances.
      const std::string first = instances.empty() ? std::string() : instances[0].get<std::string>();
      std::lock_guard<std::mutex> lock(g->stats_mu);
      g->errors["not_radiograph"] += int64_t(instances.size());
      g->last_errors.push_back(ErrorRecord{now_text(), "not_radiograph", study, first,
                                           "series " + s.value("ID", std::string()) + " has modality '" + modality +
                                               "' (" + std::to_string(instances.size()) + " instances): only CR/DX are embedded"});
      while (g->last_errors.size() > 20) g->last_errors.pop_front();
      log_info("study " + study + ": series " + s.value("ID", std::string()) + " with modality '" + modality +
               "' skipped (not_radiograph)");
      continue;
    }
    // Every instance's header in one call (keyword -> value, as clinvla_display_from_stored takes them).
    json all_tags;
    const std::string series_id = s.value("ID", std::string());
    if (!rest_get_json("/series/" + series_id + "/instances-tags?simplify", &all_tags, &code)) {
      if (code != OrthancPluginErrorCode_UnknownResource)
        record_error("orthanc_api", study, "", "cannot read the tags of series " + series_id + ": " + describe(code), false);
      continue;
    }
    for (auto& kv : all_tags.items()) {
      const std::string instance = kv.key();
      json tags = std::move(kv.value());
      try {
        const std::string photometric = upper_trim(str_of(tags, "PhotometricInterpretation"));
        int64_t samples = 1, frames = 1, rows = 0, columns = 0, number = 0;
        int_of(tags, "SamplesPerPixel", &samples);
        int_of(tags, "NumberOfFrames", &frames);
        if (tags.find("PixelData") == tags.end() && !int_of(tags, "Rows", &rows))
          throw BadInstance("not_radiograph", "no pixel data (not an image)");
        if (samples != 1 || (photometric != "MONOCHROME1" && photometric != "MONOCHROME2"))
          throw BadInstance("colour", "PhotometricInterpretation '" + photometric + "' with " + std::to_string(samples) +
                                          " samples per pixel: not a grey radiograph");
        if (frames > 1) throw BadInstance("multi_frame", std::to_string(frames) + " frames: a radiograph has one");
        if (!int_of(tags, "Rows", &rows) || !int_of(tags, "Columns", &columns) || rows <= 0 || columns <= 0)
          throw BadInstance("corrupt", "no valid Rows / Columns");
        if (rows * columns > g->cfg.max_pixels)
          throw BadInstance("huge", std::to_string(columns) + "x" + std::to_string(rows) +
                                        " pixels, more than ClinVLA.MaxPixels (" + std::to_string(g->cfg.max_pixels) + ")");
        clinvla_dicom_tags t{};
        copy_tag(t.modality, str_of(tags, "Modality"));
        copy_tag(t.view_position, str_of(tags, "ViewPosition"));
        auto vcs = tags.find("ViewCodeSequence");
        if (vcs != tags.end() && vcs->is_array() && !vcs->empty() && (*vcs)[0].is_object()) {
          copy_tag(t.view_code_meaning, str_of((*vcs)[0], "CodeMeaning"));
          copy_tag(t.view_code_scheme, str_of((*vcs)[0], "CodingSchemeDesignator"));
          copy_tag(t.view_code_value, str_of((*vcs)[0], "CodeValue"));
        }
        copy_tag(t.patient_orientation, str_of(tags, "PatientOrientation"));
        copy_tag(t.study_instance_uid, str_of(tags, "StudyInstanceUID"));
        copy_tag(t.series_instance_uid, str_of(tags, "SeriesInstanceUID"));
        copy_tag(t.sop_instance_uid, str_of(tags, "SOPInstanceUID"));
        clinvla_view view = CLINVLA_VIEW_NONE;
        char label[64] = {0}, rule[64] = {0};
        const clinvla_status s = clinvla_view_classify(g->rules, &t, &view, label, rule);
        if (s != CLINVLA_OK) throw BadInstance("corrupt", "the view rules cannot classify it: " + clinvla_error(s));
        if (view == CLINVLA_VIEW_NONE) {
          log_info("study " + study + ", instance " + instance + ": no frontal / lateral view (rule '" + rule + "')");
          continue;
        }
        Candidate c;
        c.instance = instance;
        c.view = int(view);
        c.label = label;
        c.pixels = rows * columns;
        c.has_number = int_of(tags, "InstanceNumber", &number);
        c.number = number;
        c.path = "instances/" + instance;  // as the Python Orthanc source (pipeline/orthanc.py) names it
        candidates.push_back(std::move(c));
        candidate_tags.push_back(std::move(tags));
      } catch (const BadInstance& e) {
        record_error(e.kind, study, instance, e.what(), true);
      }
    }
  }
  const auto picked = pick_views(candidates, g->ranks);
  if (picked.first < 0) {
    record_skip("no_frontal", study, "no CR/DX frontal view among its instances");
    if (g->index->remove(study)) log_info("study " + study + " removed from the index: it has no frontal view any more");
    return;
  }
  const Candidate& frontal = candidates[size_t(picked.first)];
  const Candidate* lateral = picked.second >= 0 ? &candidates[size_t(picked.second)] : nullptr;
  ImageGuard f, l;
  const Candidate* current = &frontal;
  try {
    f.p = decode(frontal.instance, candidate_tags[size_t(picked.first)]);
    if (lateral) {
      current = lateral;
      l.p = decode(lateral->instance, candidate_tags[size_t(picked.second)]);
    }
  } catch (const BadInstance& e) {
    record_error(e.kind, study, current->instance, e.what(), true);
    record_skip("view_not_decodable", study, std::string("its ") + (current == &frontal ? "frontal" : "lateral") +
                                                  " view cannot be decoded");
    return;
  }
  std::vector<float> vec(static_cast<size_t>(clinvla_engine_dim(g->engine)));
  const clinvla_status s = clinvla_engine_embed_study(g->engine, f.p, l.p, vec.data());
  if (s != CLINVLA_OK) {
    record_error("engine", study, frontal.instance, "the engine cannot embed it: " + clinvla_error(s), false);
    return;
  }
  try {
    g->index->put(study, frontal.instance, lateral ? lateral->instance : std::string(), vec.data());
  } catch (const std::exception& e) {
    record_error("index", study, "", e.what(), false);
    return;
  }
  std::lock_guard<std::mutex> lock(g->stats_mu);
  ++g->indexed_this_run;
}

void scan(bool everything) {
  json studies;
  OrthancPluginErrorCode code{};
  if (!rest_get_json("/studies", &studies, &code)) {
    record_error("orthanc_api", "*", "", "cannot list the studies: " + describe(code), false);
    return;
  }
  std::set<std::string> present;
  int64_t queued = 0;
  for (const auto& s : studies) {
    const std::string id = s.get<std::string>();
    present.insert(id);
    if (everything || !g->index->contains(id)) queued += g->queue.push(TaskKind::Index, id) ? 1 : 0;
  }
  int64_t gone = 0;
  for (const auto& id : g->index->studies())
    if (!present.count(id)) gone += g->queue.push(TaskKind::Remove, id) ? 1 : 0;
  log_info("scan of " + std::to_string(present.size()) + " studies: " + std::to_string(queued) + " queued for indexing, " +
           std::to_string(gone) + " deleted ones queued for removal");
}

void worker_main() {
  Task task;
  while (g->queue.pop(&task)) {
    try {
      switch (task.kind) {
        case TaskKind::Index: index_study(task.study); break;
        case TaskKind::Remove:
          if (g->index->remove(task.study)) {
            std::lock_guard<std::mutex> lock(g->stats_mu);
            ++g->removed_this_run;
          }
          break;
        case TaskKind::Scan: scan(false); break;
        case TaskKind::Rescan: scan(true); break;
      }
    } catch (const std::exception& e) {
      record_error("internal", task.study, "", e.what(), false);
    } catch (...) {
      record_error("internal", task.study, "", "unknown exception", false);
    }
    g->queue.done(task);
  }
}

void stop_workers() {
  g->queue.stop();
  for (auto& t : g->workers)
    if (t.joinable()) t.join();
  g->workers.clear();
}

// ---- callbacks -----------------------------------------------------------------------------------
OrthancPluginErrorCode on_change(OrthancPluginChangeType type, OrthancPluginResourceType resource, const char* id) {
  try {
    if (!g || !g->enabled) return OrthancPluginErrorCode_Success;
    if (type == OrthancPluginChangeType_StableStudy && resource == OrthancPluginResourceType_Study) {
      g->queue.push(TaskKind::Index, id);
    } else if (type == OrthancPluginChangeType_Deleted && resource == OrthancPluginResourceType_Study) {
      g->queue.push(TaskKind::Remove, id);
    } else if (type == OrthancPluginChangeType_OrthancStarted) {
      g->queue.push(TaskKind::Scan, "");
    } else if (type == OrthancPluginChangeType_OrthancStopped) {
      g->stopping = true;
      stop_workers();  // while Orthanc's REST API still answers the study in progress
    }
  } catch (const std::exception& e) {
    log_error(std::string("change callback: ") + e.what());
  } catch (...) {
    log_error("change callback: unknown exception");
  }
  return OrthancPluginErrorCode_Success;
}

void answer(OrthancPluginRestOutput* out, uint16_t status, const std::string& body, const char* mime) {
  if (status == 200) {
    OrthancPluginAnswerBuffer(g_ctx, out, body.data(), uint32_t(body.size()), mime);
  } else {
    OrthancPluginSetHttpHeader(g_ctx, out, "Content-Type", mime);
    OrthancPluginSendHttpStatus(g_ctx, out, status, body.data(), uint32_t(body.size()));
  }
}

void answer_json(OrthancPluginRestOutput* out, const json& j, uint16_t status = 200) {
  answer(out, status, dump(j), "application/json");
}

template <typename F>
OrthancPluginErrorCode guarded(OrthancPluginRestOutput* out, const OrthancPluginHttpRequest* req, const char* method,
                               bool needs_engine, F&& f) {
  try {
    if (!g) throw HttpError(503, "the ClinVLA plugin is not initialised");
    if ((std::strcmp(method, "GET") == 0 && req->method != OrthancPluginHttpMethod_Get) ||
        (std::strcmp(method, "POST") == 0 && req->method != OrthancPluginHttpMethod_Post)) {
      OrthancPluginSendMethodNotAllowed(g_ctx, out, method);
      return OrthancPluginErrorCode_Success;
    }
    if (needs_engine && !g->enabled) throw HttpError(503, "the ClinVLA plugin is disabled: " + g->disabled_reason);
    f();
  } catch (const HttpError& e) {
    answer_json(out, json{{"error", e.what()}, {"status", e.status}}, e.status);
  } catch (const std::exception& e) {
    log_error(std::string("REST: ") + e.what());
    answer_json(out, json{{"error", std::string("internal error: ") + e.what()}, {"status", 500}}, 500);
  } catch (...) {
    log_error("REST: unknown exception");
    answer_json(out, json{{"error", "internal error"}, {"status", 500}}, 500);
  }
  return OrthancPluginErrorCode_Success;
}

// Orthanc 1.10 hands GET arguments to plugins as sent: '+' and %XX are decoded here.
std::string url_decode(const char* raw, const std::string& usage) {
  std::string out;
  for (const char* p = raw; *p; ++p) {
    if (*p == '+') {
      out += ' ';
    } else if (*p == '%') {
      auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) ? (std::isdigit(static_cast<unsigned char>(c)) ? c - '0' : (std::tolower(static_cast<unsigned char>(c)) - 'a' + 10)) : -1; };
      const int hi = p[1] ? hex(p[1]) : -1, lo = (hi >= 0 && p[2]) ? hex(p[2]) : -1;
      if (hi < 0 || lo < 0) throw HttpError(400, std::string("malformed percent-encoding in '") + raw + "': use " + usage);
      out += char(hi * 16 + lo);
      p += 2;
    } else {
      out += *p;
    }
  }
  return out;
}

std::map<std::string, std::string> get_args(const OrthancPluginHttpRequest* req, const std::set<std::string>& allowed,
                                            const std::string& usage) {
  std::map<std::string, std::string> args;
  for (uint32_t i = 0; i < req->getCount; ++i) {
    const std::string key = url_decode(req->getKeys[i], usage);
    if (!allowed.count(key)) throw HttpError(400, "unknown query parameter '" + key + "': use " + usage);
    if (args.count(key)) throw HttpError(400, "query parameter '" + key + "' given twice: use " + usage);
    args[key] = url_decode(req->getValues[i], usage);
  }
  return args;
}

int64_t parse_k(const std::map<std::string, std::string>& args, const std::string& usage) {
  auto it = args.find("k");
  if (it == args.end()) return 10;
  const std::string& v = it->second;
  const bool digits = !v.empty() && v.size() <= 6 && std::all_of(v.begin(), v.end(), ::isdigit);
  const int64_t k = digits ? std::stoll(v) : 0;
  if (!digits || k < 1 || k > 1000) throw HttpError(400, "k must be a whole number from 1 to 1000, got '" + v + "': use " + usage);
  return k;
}

json results_json(const std::vector<Hit>& hits) {
  json results = json::array();
  for (const auto& h : hits) {
    json study;
    OrthancPluginErrorCode code{};
    if (!rest_get_json("/studies/" + h.study, &study, &code)) continue;  // deleted, removal queued
    json tags = study.value("PatientMainDicomTags", json::object());
    const json main_tags = study.value("MainDicomTags", json::object());  // named: items() must not outlive it
    for (const auto& kv : main_tags.items()) tags[kv.key()] = kv.value();
    results.push_back(json{{"study", h.study},
                           {"score", h.score},
                           {"frontal_instance", h.frontal},
                           {"lateral_instance", h.lateral.empty() ? json(nullptr) : json(h.lateral)},
                           {"tags", tags}});
  }
  return results;
}

OrthancPluginErrorCode rest_search(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "GET", true, [&] {
    const std::string usage = "/clinvla/search?q=small+right+pleural+effusion&k=10";
    const auto args = get_args(req, {"q", "k"}, usage);
    auto q = args.find("q");
    if (q == args.end() || upper_trim(q->second).empty())
      throw HttpError(400, "the query text q is missing or blank: use " + usage);
    if (q->second.size() > 4000) throw HttpError(400, "the query text q is longer than 4000 bytes");
    const int64_t k = parse_k(args, usage);
    std::vector<float> vec(static_cast<size_t>(clinvla_engine_dim(g->engine)));
    const clinvla_status s = clinvla_engine_embed_text(g->engine, q->second.c_str(), vec.data());
    if (s == CLINVLA_ERR_INVALID) throw HttpError(400, "the query text cannot be embedded: " + clinvla_error(s));
    if (s != CLINVLA_OK) throw std::runtime_error("the engine cannot embed the query: " + clinvla_error(s));
    const auto hits = g->index->search(vec.data(), k);
    answer_json(out, json{{"query", q->second}, {"k", k}, {"indexed", g->index->size()}, {"results", results_json(hits)}});
  });
}

OrthancPluginErrorCode rest_similar(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "GET", true, [&] {
    const std::string study = req->groupsCount > 0 ? req->groups[0] : "";
    const std::string usage = "/clinvla/studies/" + study + "/similar?k=10";
    const auto args = get_args(req, {"k"}, usage);
    const int64_t k = parse_k(args, usage);
    StudyEntry entry;
    if (!g->index->get(study, &entry)) {
      std::string ignored;
      OrthancPluginErrorCode code{};
      if (!rest_get("/studies/" + study, &ignored, &code))
        throw HttpError(404, "no study '" + study + "' in this Orthanc: give an Orthanc study id (GET /studies lists them)");
      throw HttpError(404, "study '" + study + "' is not indexed (yet, or it has no CR/DX frontal view): see /clinvla/status");
    }
    const auto hits = g->index->search(entry.vector.data(), k, study);
    answer_json(out, json{{"study", study}, {"k", k}, {"indexed", g->index->size()}, {"results", results_json(hits)}});
  });
}

// GET /clinvla/studies: the indexed study ids (cheap: no tags).
OrthancPluginErrorCode rest_studies(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "GET", true, [&] {
    get_args(req, {}, "/clinvla/studies");
    answer_json(out, json{{"studies", g->index->studies()}});
  });
}

// GET /clinvla/studies/{id}: what the index holds for a study, its vector included.
OrthancPluginErrorCode rest_study(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "GET", true, [&] {
    const std::string study = req->groupsCount > 0 ? req->groups[0] : "";
    get_args(req, {}, "/clinvla/studies/" + study);
    StudyEntry entry;
    if (!g->index->get(study, &entry))
      throw HttpError(404, "study '" + study + "' is not indexed (not yet, deleted, or no CR/DX frontal view): see /clinvla/status");
    answer_json(out, json{{"study", study}, {"frontal_instance", entry.frontal},
                          {"lateral_instance", entry.lateral.empty() ? json(nullptr) : json(entry.lateral)},
                          {"vector", entry.vector}});
  });
}

OrthancPluginErrorCode rest_status(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "GET", false, [&] {
    get_args(req, {}, "/clinvla/status");
    json s{{"enabled", g->enabled}, {"version", CLINVLA_ORTHANC_VERSION}, {"library", clinvla_version()}};
    if (!g->enabled) s["disabled_reason"] = g->disabled_reason;
    s["queue"] = g->queue.pending();
    s["in_progress"] = g->queue.in_progress();
    s["indexed"] = g->index ? g->index->size() : 0;
    {
      std::lock_guard<std::mutex> lock(g->stats_mu);
      s["errors"] = g->errors;
      s["skipped_studies"] = g->skipped;
      s["ignored_instances"] = g->ignored;
      s["indexed_since_start"] = g->indexed_this_run;
      s["removed_since_start"] = g->removed_this_run;
      json last = json::array();
      for (const auto& e : g->last_errors)
        last.push_back(json{{"time", e.time}, {"kind", e.kind}, {"study", e.study}, {"instance", e.instance}, {"message", e.message}});
      s["last_errors"] = last;
    }
    if (g->engine) {
      s["engine"] = json{{"directory", g->cfg.engine_dir}, {"device", g->cfg.device}, {"dim", clinvla_engine_dim(g->engine)},
                         {"image_size", clinvla_engine_image_size(g->engine)}, {"fingerprint", g->fingerprint}};
    }
    if (g->index) {
      const IndexStats st = g->index->stats();
      s["index"] = json{{"directory", g->cfg.index_dir}, {"generation", st.generation}, {"log_records", st.log_records},
                        {"replayed_records", st.replayed_records}, {"dropped_tail_bytes", st.dropped_tail_bytes},
                        {"snapshots", st.snapshots}, {"snapshot_every", g->cfg.snapshot_every}};
    }
    s["workers"] = g->cfg.workers;
    if (!g->cfg.view_rules.empty()) s["view_rules"] = g->cfg.view_rules;
    answer_json(out, s);
  });
}

OrthancPluginErrorCode rest_reindex(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "POST", true, [&] {
    get_args(req, {}, "POST /clinvla/reindex");
    const std::string body(static_cast<const char*>(req->body ? req->body : ""), req->bodySize);
    if (upper_trim(body).empty()) {
      g->queue.push(TaskKind::Rescan, "");
      answer_json(out, json{{"queued", "all"}, {"message", "every study of this Orthanc is queued for indexing"}});
      return;
    }
    json list;
    try {
      list = json::parse(body);
    } catch (const json::exception&) {
      throw HttpError(400, "the body must be empty (re-index every study) or a JSON array of Orthanc study ids");
    }
    if (!list.is_array()) throw HttpError(400, "the body must be empty (re-index every study) or a JSON array of Orthanc study ids");
    std::vector<std::string> ids;
    for (const auto& v : list) {
      if (!v.is_string() || v.get<std::string>().empty() || v.get<std::string>().size() > 64)
        throw HttpError(400, "every entry of the body must be an Orthanc study id (a string), got " + dump(v));
      ids.push_back(v.get<std::string>());
    }
    for (const auto& id : ids) g->queue.push(TaskKind::Index, id);
    answer_json(out, json{{"queued", ids.size()}});
  });
}

OrthancPluginErrorCode rest_ui(OrthancPluginRestOutput* out, const char*, const OrthancPluginHttpRequest* req) {
  return guarded(out, req, "GET", false, [&] {
    const std::string page = ui_page();
    answer(out, 200, page, "text/html; charset=utf-8");
  });
}

// ---- start-up --------------------------------------------------------------------------------------
Config read_config() {
  char* text = OrthancPluginGetConfiguration(g_ctx);
  if (!text) throw std::runtime_error("cannot read Orthanc's configuration");
  json all;
  try {
    all = json::parse(text);
  } catch (const json::exception& e) {
    OrthancPluginFreeString(g_ctx, text);
    throw std::runtime_error(std::string("Orthanc's configuration is not JSON: ") + e.what());
  }
  OrthancPluginFreeString(g_ctx, text);
  Config c;
  auto section = all.find("ClinVLA");
  if (section == all.end() || !section->is_object())
    throw std::runtime_error("the configuration has no \"ClinVLA\" section: add {\"ClinVLA\": {\"EngineDirectory\": "
                             "\"/srv/engine\", \"IndexDirectory\": \"/var/lib/orthanc/clinvla\"}}");
  const json& s = *section;
  const std::set<std::string> known = {"EngineDirectory", "IndexDirectory", "WorkerThreads", "Device", "RequireEngine",
                                       "SnapshotEvery", "MaxPixels", "ViewRules"};
  for (const auto& kv : s.items())
    if (!known.count(kv.key())) log_warning("unknown setting ClinVLA." + kv.key() + " is ignored");
  auto text_of = [&](const char* key, std::string* dst, bool required) {
    auto it = s.find(key);
    if (it == s.end()) {
      if (required) throw std::runtime_error(std::string("ClinVLA.") + key + " is required (a folder path)");
      return;
    }
    if (!it->is_string() || it->get<std::string>().empty())
      throw std::runtime_error(std::string("ClinVLA.") + key + " must be a non-empty string, got " + dump(*it));
    *dst = it->get<std::string>();
  };
  auto int_in = [&](const char* key, int64_t lo, int64_t hi, int64_t* dst) {
    auto it = s.find(key);
    if (it == s.end()) return;
    if (!it->is_number_integer() || it->get<int64_t>() < lo || it->get<int64_t>() > hi)
      throw std::runtime_error(std::string("ClinVLA.") + key + " must be a whole number from " + std::to_string(lo) + " to " +
                               std::to_string(hi) + ", got " + dump(*it));
    *dst = it->get<int64_t>();
  };
  auto req = s.find("RequireEngine");
  if (req != s.end()) {
    if (!req->is_boolean()) throw std::runtime_error("ClinVLA.RequireEngine must be true or false, got " + dump(*req));
    c.require_engine = req->get<bool>();
  }
  text_of("EngineDirectory", &c.engine_dir, true);
  text_of("IndexDirectory", &c.index_dir, true);
  text_of("Device", &c.device, false);
  text_of("ViewRules", &c.view_rules, false);
  int64_t workers = c.workers;
  int_in("WorkerThreads", 1, 64, &workers);
  c.workers = int(workers);
  int_in("SnapshotEvery", 1, int64_t(1) << 40, &c.snapshot_every);
  int_in("MaxPixels", 1, int64_t(1) << 40, &c.max_pixels);
  if (c.view_rules.empty()) {
    // libclinvla's installed copy, else the source tree's this plugin was built from
    for (const char* candidate : {CLINVLA_ORTHANC_VIEW_RULES_INSTALLED, CLINVLA_ORTHANC_VIEW_RULES})
      if (*candidate && std::ifstream(candidate).good()) {
        c.view_rules = candidate;
        break;
      }
  }
  if (c.view_rules.empty())
    throw std::runtime_error("ClinVLA.ViewRules is not set and neither " + std::string(CLINVLA_ORTHANC_VIEW_RULES_INSTALLED) +
                             " nor " + CLINVLA_ORTHANC_VIEW_RULES + " exists: point it to clinvla_engine/data/view_rules.json");
  return c;
}

// The engine's identity for the index: CRC-32C and size of its manifest (which holds every file's SHA-256).
std::string engine_fingerprint(const std::string& dir) {
  std::ifstream in(dir + "/manifest.json", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string m = ss.str();
  char buf[64];
  std::snprintf(buf, sizeof(buf), "manifest-crc32c-%08x-%zu", clinvla_crc32c(m.data(), m.size(), 0), m.size());
  return buf;
}

void start(State* st) {
  st->cfg = read_config();
  const Config& c = st->cfg;
  st->ranks = load_pick_ranks(c.view_rules);
  clinvla_status s = clinvla_view_rules_load(c.view_rules.c_str(), &st->rules);
  if (s != CLINVLA_OK) throw std::runtime_error("cannot load the view rules '" + c.view_rules + "': " + clinvla_error(s));
  s = clinvla_engine_load(c.engine_dir.c_str(), c.device.c_str(), &st->engine);
  if (s != CLINVLA_OK)
    throw std::runtime_error("cannot load the engine bundle '" + c.engine_dir + "' on " + c.device + ": " + clinvla_error(s) +
                             " (ClinVLA.EngineDirectory must be an engine bundle built by clinvla-build-engine, unmodified)");
  st->fingerprint = engine_fingerprint(c.engine_dir);
  st->index = std::make_unique<StudyIndex>(c.index_dir, clinvla_engine_dim(st->engine), st->fingerprint, c.snapshot_every,
                                           [](const std::string& m) { log_warning(m); });
}

void free_state(State* st) {
  if (!st) return;
  stop_workers();
  st->index.reset();
  if (st->engine) clinvla_engine_free(st->engine);
  if (st->rules) clinvla_view_rules_free(st->rules);
  st->engine = nullptr;
  st->rules = nullptr;
}

}  // namespace
}  // namespace clinvla_orthanc

using namespace clinvla_orthanc;

extern "C" {

ORTHANC_PLUGINS_API int32_t OrthancPluginInitialize(OrthancPluginContext* context) {
  g_ctx = context;
  try {
    if (!OrthancPluginCheckVersion(context)) {
      log_error(std::string("this Orthanc is too old: the plugin needs Orthanc >= ") +
                std::to_string(ORTHANC_PLUGINS_MINIMAL_MAJOR_NUMBER) + "." + std::to_string(ORTHANC_PLUGINS_MINIMAL_MINOR_NUMBER) +
                "." + std::to_string(ORTHANC_PLUGINS_MINIMAL_REVISION_NUMBER) + ", this is " + context->orthancVersion);
      return -1;
    }
    OrthancPluginSetDescription(context, "ClinVLA: embeds chest X-ray studies as they arrive and searches them by text or by study");
    g = new State();
    bool require = true;
    try {
      start(g);
      require = g->cfg.require_engine;
      g->enabled = true;
      g->disabled_reason.clear();
    } catch (const std::exception& e) {
      require = g->cfg.require_engine;
      // RequireEngine may itself be what failed to parse: read it leniently from the raw config.
      if (char* text = OrthancPluginGetConfiguration(context)) {
        try {
          const json all = json::parse(text);
          const auto it = all.find("ClinVLA");
          if (it != all.end() && it->is_object() && it->contains("RequireEngine") && (*it)["RequireEngine"].is_boolean())
            require = (*it)["RequireEngine"].get<bool>();
        } catch (...) {
        }
        OrthancPluginFreeString(context, text);
      }
      free_state(g);
      g->disabled_reason = e.what();
      if (require) {
        log_error(std::string(e.what()) + " -- Orthanc does not start because ClinVLA.RequireEngine is true "
                                          "(set it to false to start Orthanc with the plugin disabled)");
        delete g;
        g = nullptr;
        return -1;
      }
      log_error(std::string(e.what()) + " -- the ClinVLA plugin is DISABLED; Orthanc serves without it "
                                        "(ClinVLA.RequireEngine is false)");
    }
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/search", rest_search);
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/studies/([^/]+)/similar", rest_similar);
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/status", rest_status);
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/studies", rest_studies);
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/studies/([^/]+)", rest_study);
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/reindex", rest_reindex);
    OrthancPluginRegisterRestCallbackNoLock(context, "/clinvla/ui", rest_ui);
    if (g->enabled) {
      OrthancPluginRegisterOnChangeCallback(context, on_change);
      for (int i = 0; i < g->cfg.workers; ++i) g->workers.emplace_back(worker_main);
      const IndexStats st = g->index->stats();
      log_warning("ready: engine " + g->cfg.engine_dir + " (" + std::to_string(clinvla_engine_dim(g->engine)) + "-d, " +
                  g->cfg.device + "), index " + g->cfg.index_dir + " with " + std::to_string(st.studies) + " studies (" +
                  std::to_string(st.replayed_records) + " log records replayed), " + std::to_string(g->cfg.workers) +
                  " worker thread(s)");
    }
    return 0;
  } catch (const std::exception& e) {
    log_error(std::string("initialisation failed: ") + e.what());
  } catch (...) {
    log_error("initialisation failed: unknown exception");
  }
  return -1;
}

ORTHANC_PLUGINS_API void OrthancPluginFinalize() {
  try {
    if (g) {
      free_state(g);
      delete g;
      g = nullptr;
    }
  } catch (...) {
  }
}

ORTHANC_PLUGINS_API const char* OrthancPluginGetName() { return "clinvla"; }

ORTHANC_PLUGINS_API const char* OrthancPluginGetVersion() { return CLINVLA_ORTHANC_VERSION; }

}  // extern "C"
