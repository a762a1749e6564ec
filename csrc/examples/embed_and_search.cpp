// Embeds one DICOM study with libclinvla's C API and searches an index file for the most similar
// studies: what a PACS integration does when a study arrives.
//
//   embed_and_search ENGINE_DIR INDEX.clvx FRONTAL.dcm [LATERAL.dcm] [K]
//
// Prints the view the rules gave each file, then one line "rank id score" per result.
#include <clinvla/engine.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static int fail(const char* what) {
  std::fprintf(stderr, "embed_and_search: %s: %s\n", what, clinvla_last_error());
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 4 || argc > 6) {
    std::fprintf(stderr, "usage: embed_and_search ENGINE_DIR INDEX.clvx FRONTAL.dcm [LATERAL.dcm] [K]\n");
    return 2;
  }
  const char* lateral_path = argc >= 5 && std::strstr(argv[4], ".dcm") ? argv[4] : nullptr;
  const int64_t k = argc == 6 ? std::atoll(argv[5]) : (argc == 5 && !lateral_path ? std::atoll(argv[4]) : 5);

  clinvla_engine* engine = nullptr;
  if (clinvla_engine_load(argv[1], nullptr, &engine) != CLINVLA_OK) return fail(argv[1]);
  clinvla_view_rules* rules = nullptr;
  if (clinvla_view_rules_load(nullptr, &rules) != CLINVLA_OK) return fail("view rules");

  clinvla_image* images[2] = {nullptr, nullptr};
  const char* paths[2] = {argv[3], lateral_path};
  for (int v = 0; v < 2 && paths[v]; ++v) {
    clinvla_dicom_tags tags;
    if (clinvla_dicom_read_image(paths[v], &images[v], &tags) != CLINVLA_OK) return fail(paths[v]);
    clinvla_view view = CLINVLA_VIEW_NONE;
    char label[32], rule[32];
    if (clinvla_view_classify(rules, &tags, &view, label, rule) != CLINVLA_OK) return fail(paths[v]);
    std::printf("%s: %s (%s by %s)\n", paths[v],
                view == CLINVLA_VIEW_FRONTAL ? "frontal" : view == CLINVLA_VIEW_LATERAL ? "lateral" : "none",
                label, rule);
  }

  std::vector<float> query(static_cast<size_t>(clinvla_engine_dim(engine)));
  if (clinvla_engine_embed_study(engine, images[0], images[1], query.data()) != CLINVLA_OK) return fail("embed");

  clinvla_index* index = nullptr;
  if (clinvla_index_load(argv[2], 1, &index) != CLINVLA_OK) return fail(argv[2]);
  if (clinvla_index_dim(index) != clinvla_engine_dim(engine)) {
    std::fprintf(stderr, "embed_and_search: %s holds %lld-d vectors, the engine makes %lld-d ones\n", argv[2],
                 static_cast<long long>(clinvla_index_dim(index)), static_cast<long long>(clinvla_engine_dim(engine)));
    return 1;
  }
  std::vector<float> scores(static_cast<size_t>(k));
  std::vector<int64_t> ids(static_cast<size_t>(k));
  if (clinvla_index_search(index, 1, query.data(), CLINVLA_FLOAT32, k, nullptr, scores.data(), ids.data()) != CLINVLA_OK)
    return fail("search");
  for (int64_t i = 0; i < k && ids[i] >= 0; ++i)
    std::printf("%lld %lld %.6f\n", static_cast<long long>(i + 1), static_cast<long long>(ids[i]), scores[i]);

  clinvla_index_free(index);
  clinvla_image_free(images[0]);
  clinvla_image_free(images[1]);
  clinvla_view_rules_free(rules);
  clinvla_engine_free(engine);
  return 0;
}
