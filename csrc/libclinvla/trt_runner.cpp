// TensorRT plans behind clinvla::Engine (compiled only with -DCLINVLA_WITH_TENSORRT=ON, where
// TensorRT 10/11 and a CUDA build of libtorch are installed). Mirrors runners.py's TrtRunner: one
// execution context per optimisation profile (= batch bucket), tensors bound by name
// (setInputShape / setTensorAddress) and run with enqueueV3 on libtorch's current CUDA stream.
#include <NvInferRuntime.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <fstream>
#include <map>
#include <sstream>

#include "../core/internal.hpp"
#include "runner.hpp"

namespace clinvla {
namespace detail {
namespace {

class TrtLogger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "libclinvla TensorRT: %s\n", msg);
  }
};

TrtLogger& logger() {
  static TrtLogger l;
  return l;
}

at::ScalarType torch_type(nvinfer1::DataType t, const std::string& name) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT64: return at::kLong;
    case nvinfer1::DataType::kINT32: return at::kInt;
    case nvinfer1::DataType::kBOOL: return at::kBool;
    default: fail(ErrorCode::Unsupported, "TensorRT tensor ", name, " has a data type libclinvla does not bind");
  }
}

class TrtRunner final : public GraphRunner {
 public:
  TrtRunner(const Manifest& m, const GraphSpec& g, const c10::Device& device) : device_(device), spec_(g) {
    c10::cuda::CUDAGuard guard(device);
    std::ifstream in(m.directory + "/" + g.file, std::ios::binary);
    if (!in) fail(ErrorCode::IO, "cannot read ", m.directory, "/", g.file);
    std::stringstream buf;
    buf << in.rdbuf();
    const std::string plan = buf.str();
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) fail(ErrorCode::Internal, "TensorRT could not create a runtime");
    engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_) {
      auto it = m.versions.find("tensorrt");
      fail(ErrorCode::Format, "TensorRT could not deserialize ", g.file, " (built with TensorRT ",
           it == m.versions.end() ? "?" : it->second, "); rebuild the engine with clinvla-build-engine "
           "--backend tensorrt on this machine");
    }
    const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    if (g.profiles.empty()) fail(ErrorCode::Format, "engine bundle ", m.directory, ": graph ", g.file, " lists no profiles");
    for (size_t k = 0; k < g.profiles.size(); ++k) {
      std::unique_ptr<nvinfer1::IExecutionContext> ctx(engine_->createExecutionContext());
      if (!ctx || !ctx->setOptimizationProfileAsync(int32_t(k), stream.stream()))
        fail(ErrorCode::Internal, "TensorRT could not create a context for profile ", k, " of ", g.file);
      contexts_[g.profiles[k]] = std::move(ctx);
    }
    stream.synchronize();
  }

  bool static_shapes() const override { return true; }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override {
    c10::cuda::CUDAGuard guard(device_);
    const int64_t batch = inputs.at(0).size(0);
    auto it = contexts_.find(batch);
    if (it == contexts_.end()) fail(ErrorCode::Invalid, "batch ", batch, " is not one of the engine's buckets");
    nvinfer1::IExecutionContext& ctx = *it->second;
    for (size_t i = 0; i < spec_.inputs.size(); ++i) {
      const at::Tensor& x = inputs[i];
      nvinfer1::Dims dims{};
      dims.nbDims = int32_t(x.dim());
      for (int64_t d = 0; d < x.dim(); ++d) dims.d[d] = x.size(d);
      const char* name = spec_.inputs[i].name.c_str();
      if (!ctx.setInputShape(name, dims) || !ctx.setTensorAddress(name, x.data_ptr()))
        fail(ErrorCode::Invalid, "TensorRT refused input ", name, " of shape ", x.sizes());
    }
    std::vector<at::Tensor> outs;
    for (const auto& o : spec_.outputs) {
      const nvinfer1::Dims d = ctx.getTensorShape(o.name.c_str());
      std::vector<int64_t> shape(d.d, d.d + d.nbDims);
      at::Tensor out = at::empty(shape, at::TensorOptions().device(device_).dtype(
                                            torch_type(engine_->getTensorDataType(o.name.c_str()), o.name)));
      if (!ctx.setTensorAddress(o.name.c_str(), out.data_ptr()))
        fail(ErrorCode::Internal, "TensorRT refused output ", o.name);
      outs.push_back(out);
    }
    const auto stream = c10::cuda::getCurrentCUDAStream(device_.index());
    if (!ctx.enqueueV3(stream.stream())) fail(ErrorCode::Cuda, "TensorRT enqueueV3 failed for ", spec_.file);
    stream.synchronize();
    return outs;
  }

 private:
  c10::Device device_;
  GraphSpec spec_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::map<int64_t, std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;  // bucket -> context
};

}  // namespace

std::unique_ptr<GraphRunner> make_trt_runner(const Manifest& m, const GraphSpec& g, const c10::Device& device) {
  if (!device.is_cuda()) fail(ErrorCode::Invalid, "a TensorRT engine runs on CUDA only");
  return std::make_unique<TrtRunner>(m, g, device);
}

}  // namespace detail
}  // namespace clinvla
