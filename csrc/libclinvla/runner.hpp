// The graph runners behind clinvla::Engine (internal; includes libtorch, so only the runner .cpp
// files and engine.cpp include it).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"

namespace clinvla {
namespace detail {

class GraphRunner {
 public:
  virtual ~GraphRunner() = default;
  // Inputs in the graph's input order on the runner's device; outputs in the graph's output order.
  // Calls are serialised by the engine (one lock per graph).
  virtual std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) = 0;
  // true: only the batch sizes in the bundle's buckets run (the engine pads by repeating the last row).
  virtual bool static_shapes() const { return false; }
};

// AOTInductor .pt2 package (engine.cpp).
std::unique_ptr<GraphRunner> make_aoti_runner(const Manifest& m, const GraphSpec& g, const c10::Device& device);

#ifdef CLINVLA_WITH_TENSORRT
// Serialized TensorRT plan (trt_runner.cpp, built with -DCLINVLA_WITH_TENSORRT=ON).
std::unique_ptr<GraphRunner> make_trt_runner(const Manifest& m, const GraphSpec& g, const c10::Device& device);
#endif

}  // namespace detail
}  // namespace clinvla
