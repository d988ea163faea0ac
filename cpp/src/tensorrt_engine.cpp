// The TensorRT engine of libsrds_trt (CMake option SRDS_TRT_WITH_TENSORRT). Written against TensorRT's documented
// C++ API (IRuntime::deserializeCudaEngine, IExecutionContext::setInputShape / setTensorAddress / enqueueV3) and
// libtorch with CUDA; NOT compiled or executed on the development machine (no GPU, no TensorRT C++ SDK there).
// The plan has been verified (sha256, plain name inside the folder) by open_export before this file reads it.
// One execution context on profile 0 (one lane); rows per call within the plan's profile [min_batch, max_batch].
#include <NvInfer.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdio>
#include <fstream>
#include <iterator>

#include "runtime.hpp"

namespace srds {
namespace {
struct Logger : nvinfer1::ILogger {
  void log(Severity severity, const char *message) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", message);
  }
};

nvinfer1::Dims dims_of(const at::Tensor &t) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) d.d[i] = t.size(i);
  return d;
}

struct TensorRTEngine : Engine {
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  std::string cond_name;

  TensorRTEngine(const std::string &plan_path, const std::string &cond_input) : cond_name(cond_input) {
    std::ifstream in(plan_path, std::ios::binary);
    std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    runtime.reset(nvinfer1::createInferRuntime(logger));
    engine.reset(runtime ? runtime->deserializeCudaEngine(plan.data(), plan.size()) : nullptr);
    if (!engine) throw Error(Code::Engine, "TensorRT could not deserialise " + plan_path + " (see its log)");
    context.reset(engine->createExecutionContext());
    if (!context) throw Error(Code::Engine, "TensorRT could not create an execution context");
  }

  at::Tensor run(const at::Tensor &sample, const at::Tensor &timestep, const at::Tensor &cond) override {
    auto stream = c10::cuda::getCurrentCUDAStream();
    auto x = sample.to(at::kCUDA).contiguous(), t = timestep.to(at::kCUDA).contiguous();
    auto c = cond.to(at::kCUDA).contiguous();
    auto out = at::empty_like(x);
    bool ok = context->setInputShape("sample", dims_of(x)) && context->setInputShape("timestep", dims_of(t)) &&
              context->setInputShape(cond_name.c_str(), dims_of(c)) &&
              context->setTensorAddress("sample", x.data_ptr()) && context->setTensorAddress("timestep", t.data_ptr()) &&
              context->setTensorAddress(cond_name.c_str(), c.data_ptr()) &&
              context->setTensorAddress("model_output", out.data_ptr()) && context->enqueueV3(stream.stream());
    if (!ok) throw Error(Code::Engine, "TensorRT enqueueV3 failed (rows outside the plan's profile?)");
    return out.to(at::kCPU);  // synchronises the stream; the samplers keep their states on the host here
  }
};
}  // namespace

std::unique_ptr<Engine> make_tensorrt_engine(const std::string &plan_path, const std::string &cond_input) {
  return std::make_unique<TensorRTEngine>(plan_path, cond_input);
}
}  // namespace srds
