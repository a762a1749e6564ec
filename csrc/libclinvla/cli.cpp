// clinvla_cli: check libclinvla from a shell.
//
//   clinvla_cli tokenize BUNDLE_DIR      report lines on stdin -> one line of token ids per line
//   clinvla_cli embed-text BUNDLE_DIR    report lines on stdin -> one JSON array per line
//   clinvla_cli embed-study BUNDLE_DIR FRONTAL.dcm [LATERAL.dcm]   -> one JSON array
//
// The ids are those the engine's text graph receives (section headers dropped, WordPiece, cut to
// the bundle's max_text_len); the embeddings are L2-normalised float32, as Python's Engine gives
// them. Exit status: 0 done, 1 an input or the bundle was refused (message on stderr), 2 usage.
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "clinvla/engine.h"
#include "clinvla/engine.hpp"

namespace {

int usage(const char* why) {
  if (why) std::fprintf(stderr, "clinvla_cli: %s\n", why);
  std::fprintf(stderr,
               "usage: clinvla_cli tokenize BUNDLE_DIR            (report lines on stdin)\n"
               "       clinvla_cli embed-text BUNDLE_DIR          (report lines on stdin)\n"
               "       clinvla_cli embed-study BUNDLE_DIR FRONTAL.dcm [LATERAL.dcm]\n");
  return 2;
}

void print_json(const float* v, int64_t n) {
  std::string line = "[";
  char buf[32];
  for (int64_t i = 0; i < n; ++i) {
    std::snprintf(buf, sizeof buf, i ? ",%.9g" : "%.9g", double(v[i]));
    line += buf;
  }
  line += "]\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
}

int run(int argc, char** argv) {
  const std::string cmd = argv[1];
  clinvla::Engine engine = clinvla::Engine::load(argv[2]);
  const int64_t dim = engine.dim();
  if (cmd == "tokenize" || cmd == "embed-text") {
    if (argc != 3) return usage("tokenize and embed-text take BUNDLE_DIR and read stdin");
    std::string line;
    int64_t number = 0;
    std::vector<float> emb(static_cast<size_t>(dim));
    while (std::getline(std::cin, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      try {
        if (cmd == "tokenize") {
          std::vector<int64_t> ids = engine.tokenize(line);
          if (int64_t(ids.size()) > engine.max_text_len()) {  // as the engine cuts them (graphs.truncate_tokens)
            ids.resize(size_t(engine.max_text_len()));
            ids.back() = engine.sep_id();
          }
          std::string out;
          for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
          out += "\n";
          std::fwrite(out.data(), 1, out.size(), stdout);
        } else {
          engine.embed_texts({line}, emb.data());
          print_json(emb.data(), dim);
        }
      } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "clinvla_cli: stdin line %lld: %s\n", static_cast<long long>(number), e.what());
        return 1;
      }
    }
    return 0;
  }
  if (cmd == "embed-study") {
    if (argc != 4 && argc != 5) return usage("embed-study takes BUNDLE_DIR FRONTAL.dcm [LATERAL.dcm]");
#ifdef CLINVLA_HAVE_DICOM
    clinvla_image* images[2] = {nullptr, nullptr};
    int status = 0;
    for (int k = 0; k < argc - 3 && status == 0; ++k) {
      if (clinvla_dicom_read_image(argv[3 + k], &images[k], nullptr) != CLINVLA_OK) {
        std::fprintf(stderr, "clinvla_cli: %s: %s\n", argv[3 + k], clinvla_last_error());
        status = 1;
      }
    }
    std::vector<float> emb(static_cast<size_t>(dim));
    if (status == 0) {
      clinvla::GreyImage f{clinvla_image_data(images[0]), clinvla_image_height(images[0]),
                           clinvla_image_width(images[0]), 0};
      clinvla::GreyImage l{};
      const clinvla::GreyImage* fp = &f;
      const clinvla::GreyImage* lp = nullptr;
      if (images[1]) {
        l = {clinvla_image_data(images[1]), clinvla_image_height(images[1]), clinvla_image_width(images[1]), 0};
        lp = &l;
      }
      try {
        engine.embed_studies(1, &fp, &lp, emb.data());
        print_json(emb.data(), dim);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "clinvla_cli: %s: %s\n", argv[3], e.what());
        status = 1;
      }
    }
    clinvla_image_free(images[0]);
    clinvla_image_free(images[1]);
    return status;
#else
    std::fprintf(stderr, "clinvla_cli: this build has no DICOM reader (csrc/libclinvla/dicom.cpp was missing when "
                         "libclinvla was configured); rebuild with make cpp\n");
    return 1;
#endif
  }
  return usage(("unknown command " + cmd).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage(argc < 2 ? nullptr : "missing BUNDLE_DIR");
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "clinvla_cli: %s\n", e.what());
    return 1;
  }
}
