// The C ABI (srds_trt.h) over the C++ runtime: argument checks, conditioning and guidance around the engine, and
// the boundary where every exception becomes a status code and a thread-local message.
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "runtime.hpp"
#include "srds_trt.h"

struct srds_trt_runtime {
  std::unique_ptr<srds::Export> e;
  std::mutex mutex;  // calls on one handle are serialised (see the header)
};

namespace {
thread_local std::string last_error;
constexpr int kMaxSteps = 8192;  // as the Python settings (pipeline.MAX_STEPS)
using Clock = std::chrono::steady_clock;

srds_trt_status fail(srds_trt_status status, std::string message) {
  for (auto &c : message)
    if (c == '\n' || c == '\r') c = ' ';  // one line, whatever the source
  last_error = std::move(message);
  return status;
}

template <class F>
srds_trt_status guarded(F &&body) {
  try {
    last_error.clear();
    return body();
  } catch (const srds::Error &e) {
    return fail(static_cast<srds_trt_status>(e.code), e.what());
  } catch (const std::bad_alloc &) {
    return fail(SRDS_TRT_INTERNAL_ERROR, "out of memory");
  } catch (const std::exception &e) {
    std::string what = e.what();
    return fail(SRDS_TRT_ENGINE_ERROR, "engine failure: " + what.substr(0, what.find('\n')));
  } catch (...) {
    return fail(SRDS_TRT_INTERNAL_ERROR, "unknown exception");
  }
}

void invalid(const std::string &message) { throw srds::Error(srds::Code::InvalidArgument, message); }

int64_t sample_numel(const srds::Export &e) { return e.sample_shape[0] * e.sample_shape[1] * e.sample_shape[2]; }

// model(x, t) over the engine: per-image conditioning tiled to the rows (segment-major: row r is image r % batch),
// classifier-free guidance as one call of [uncond rows; cond rows] (guidance.py), calls above the package's row
// limit in chunks, engine time accumulated.
srds::Model make_model(srds::Export &e, const at::Tensor &cond, const at::Tensor &uncond, double scale,
                       int64_t *engine_calls, double *engine_seconds) {
  // The engine's conditioning for a call of `rows` state rows, built once per row count (ticks repeat them).
  auto conds = std::make_shared<std::map<int64_t, at::Tensor>>();
  return [&e, cond, uncond, scale, engine_calls, engine_seconds, conds](const at::Tensor &x, const at::Tensor &t) {
    const int64_t rows = x.size(0), batch = cond.size(0);
    auto &c = (*conds)[rows];
    if (!c.defined()) {
      auto tile = [&](const at::Tensor &per_image) {
        std::vector<int64_t> reps(static_cast<size_t>(per_image.dim()), 1);
        reps[0] = rows / batch;
        return per_image.repeat(reps);
      };
      c = scale == 1.0 ? tile(cond) : at::cat({tile(uncond), tile(cond)});
      if (c.is_floating_point()) c = c.to(e.dtype);
    }
    auto engine = [&](const at::Tensor &xs, const at::Tensor &ts) {
      auto sample = xs.to(e.dtype), timestep = ts.to(at::kFloat);
      std::vector<at::Tensor> outs;
      const int64_t total = sample.size(0);
      for (int64_t start = 0; start < total; start += e.max_rows) {
        const int64_t end = std::min(total, start + e.max_rows);
        const bool whole = start == 0 && end == total;
        auto begin = Clock::now();
        auto out = whole ? e.engine->run(sample, timestep, c)
                         : e.engine->run(sample.slice(0, start, end).contiguous(),
                                         timestep.slice(0, start, end).contiguous(), c.slice(0, start, end).contiguous());
        *engine_seconds += std::chrono::duration<double>(Clock::now() - begin).count();
        ++*engine_calls;
        outs.push_back(out);
      }
      auto out = outs.size() == 1 ? outs[0] : at::cat(outs);
      return out.to(x.dtype());
    };
    if (scale == 1.0) return engine(x, t);
    auto out = engine(at::cat({x, x}), at::cat({t, t}));
    auto halves = out.split(rows);
    // uncond + scale * (cond - uncond), as guidance.py, in place on the temporary (same operations, same bits)
    return (halves[1] - halves[0]).mul_(scale).add_(halves[0]);
  };
}
}  // namespace

extern "C" {

const char *srds_trt_version(void) { return "0.1.0"; }

const char *srds_trt_last_error(void) { return last_error.c_str(); }

void srds_trt_request_init(srds_trt_request *r) {
  if (r == nullptr) return;
  std::memset(r, 0, sizeof(*r));
  r->struct_size = sizeof(*r);
  r->sampler = SRDS_TRT_SAMPLER_SRDS;
  r->steps = 100;
  r->num_images = 1;
  r->guidance_scale = NAN;  // NaN: the export's default
  r->tol = NAN;             // NaN: the export's default
  r->num_blocks = 0;
  r->max_iters = -1;
}

void srds_trt_report_init(srds_trt_report *r) {
  if (r == nullptr) return;
  std::memset(r, 0, sizeof(*r));
  r->struct_size = sizeof(*r);
}

srds_trt_status srds_trt_open(const char *export_dir, srds_trt_runtime **runtime) {
  return srds_trt_open_engine(export_dir, SRDS_TRT_ENGINE_AOTINDUCTOR, runtime);
}

srds_trt_status srds_trt_open_engine(const char *export_dir, int32_t engine, srds_trt_runtime **runtime) {
  return guarded([&] {
    if (runtime == nullptr || export_dir == nullptr) invalid("srds_trt_open: export_dir and runtime must not be NULL");
    if (engine != SRDS_TRT_ENGINE_AOTINDUCTOR && engine != SRDS_TRT_ENGINE_TENSORRT)
      invalid("engine must be SRDS_TRT_ENGINE_AOTINDUCTOR (0) or SRDS_TRT_ENGINE_TENSORRT (1)");
    auto handle = std::make_unique<srds_trt_runtime>();
    handle->e = srds::open_export(export_dir, static_cast<srds::EngineKind>(engine));
    *runtime = handle.release();
    return SRDS_TRT_OK;
  });
}

srds_trt_status srds_trt_info_get(srds_trt_runtime *runtime, srds_trt_info *info) {
  return guarded([&] {
    if (runtime == nullptr || info == nullptr) invalid("srds_trt_info_get: runtime and info must not be NULL");
    const auto &e = *runtime->e;
    srds_trt_info i{};
    i.struct_size = sizeof(i);
    i.channels = static_cast<int32_t>(e.sample_shape[0]);
    i.height = static_cast<int32_t>(e.sample_shape[1]);
    i.width = static_cast<int32_t>(e.sample_shape[2]);
    i.conditioning = e.conditioning == "class" ? 0 : 1;
    i.num_classes = static_cast<int32_t>(e.num_classes);
    i.null_class = static_cast<int32_t>(e.null_class);
    i.cond_length = e.cond_shape.size() == 2 ? static_cast<int32_t>(e.cond_shape[0]) : 0;
    i.cond_dim = e.cond_shape.size() == 2 ? static_cast<int32_t>(e.cond_shape[1]) : 0;
    i.max_rows = static_cast<int32_t>(e.max_rows);
    i.default_guidance_scale = e.default_guidance;
    i.default_tol = e.default_tol;
    *info = i;
    return SRDS_TRT_OK;
  });
}

srds_trt_status srds_trt_generate(srds_trt_runtime *runtime, const srds_trt_request *request, float *out,
                                  size_t out_len, srds_trt_report *report) {
  return guarded([&] {
    const auto begin = Clock::now();
    if (runtime == nullptr || request == nullptr || out == nullptr)
      invalid("srds_trt_generate: runtime, request and out must not be NULL");
    if (request->struct_size != sizeof(srds_trt_request))
      invalid("request.struct_size must be sizeof(srds_trt_request): initialise it with srds_trt_request_init");
    if (report != nullptr && report->struct_size != sizeof(srds_trt_report))
      invalid("report.struct_size must be sizeof(srds_trt_report): initialise it with srds_trt_report_init");
    std::lock_guard<std::mutex> lock(runtime->mutex);
    auto &e = *runtime->e;
    const srds_trt_request &r = *request;
    if (r.sampler != SRDS_TRT_SAMPLER_SERIAL && r.sampler != SRDS_TRT_SAMPLER_SRDS && r.sampler != SRDS_TRT_SAMPLER_PARADIGMS)
      invalid("sampler must be SRDS_TRT_SAMPLER_SERIAL (0), _SRDS (1) or _PARADIGMS (2), got " + std::to_string(r.sampler));
    if (r.sampler == SRDS_TRT_SAMPLER_PARADIGMS && e.stopping.paradigms_fraction < 0)
      invalid("this export's sampler.json has no ParaDiGMS calibration (window_accept); re-export with --aoti");
    if (r.window < 0 || r.window > r.steps)
      invalid("window must be 0 (default) or in [1, steps=" + std::to_string(r.steps) + "], got " + std::to_string(r.window));
    if (r.steps < 1 || r.steps > kMaxSteps)
      invalid("steps must be an integer in [1, " + std::to_string(kMaxSteps) + "], got " + std::to_string(r.steps));
    if (r.num_images < 1 || r.num_images > 65536)
      invalid("num_images must be in [1, 65536], got " + std::to_string(r.num_images));
    const double tol = std::isnan(r.tol) ? e.default_tol : r.tol;
    if (!(tol >= 0) || !std::isfinite(tol)) invalid("tol must be a finite number >= 0, got " + std::to_string(r.tol));
    const double scale = std::isnan(r.guidance_scale) ? e.default_guidance : r.guidance_scale;
    if (!std::isfinite(scale)) invalid("guidance_scale must be finite");
    if (r.num_blocks < 0 || r.num_blocks > r.steps)
      invalid("num_blocks must be 0 (default) or in [1, steps=" + std::to_string(r.steps) + "], got " +
              std::to_string(r.num_blocks));
    if (r.max_iters < -1) invalid("max_iters must be -1 (the block count) or >= 0, got " + std::to_string(r.max_iters));
    if (r.cuda_stream != nullptr) invalid("cuda_stream must be NULL: this libsrds_trt runs on the CPU");
    const int64_t n = r.num_images, per_image = sample_numel(e);
    if (out_len != static_cast<size_t>(n * per_image))
      invalid("out holds " + std::to_string(out_len) + " floats; num_images * C * H * W = " +
              std::to_string(n * per_image));

    at::Tensor cond, uncond;
    if (e.conditioning == "class") {
      if (r.class_ids == nullptr) invalid("class_ids must not be NULL for this export (class conditioning)");
      cond = at::from_blob(const_cast<int64_t *>(r.class_ids), {n}, at::kLong).clone();
      if ((cond < 0).any().item().toBool() || (cond >= e.num_classes).any().item().toBool())
        invalid("class_ids must lie in [0, " + std::to_string(e.num_classes - 1) + "] (" +
                std::to_string(e.null_class) + " = unconditional)");
      uncond = at::full({n}, e.null_class, at::kLong);
    } else {
      if (r.embeddings == nullptr || (scale != 1.0 && r.uncond_embeddings == nullptr))
        invalid("embeddings (and uncond_embeddings when guidance_scale != 1) must not be NULL for a text export");
      const int64_t L = e.cond_shape[0], D = e.cond_shape[1];
      cond = at::from_blob(const_cast<float *>(r.embeddings), {n, L, D}, at::kFloat).clone();
      uncond = scale != 1.0 ? at::from_blob(const_cast<float *>(r.uncond_embeddings), {1, L, D}, at::kFloat)
                                  .expand({n, L, D}).clone()
                            : at::zeros({n, L, D});
      if (!at::isfinite(cond).all().item().toBool() || !at::isfinite(uncond).all().item().toBool())
        invalid("embeddings must be finite");
    }
    std::vector<int64_t> shape{n, e.sample_shape[0], e.sample_shape[1], e.sample_shape[2]};
    at::Tensor x;
    if (r.initial_noise != nullptr) {
      x = at::from_blob(const_cast<float *>(r.initial_noise), shape, at::kFloat).clone();
      if (!at::isfinite(x).all().item().toBool()) invalid("initial_noise must be finite");
    } else {  // as Python: torch.randn(shape, generator=torch.Generator().manual_seed(seed))
      auto generator = at::make_generator<at::CPUGeneratorImpl>(r.seed);
      x = at::randn(shape, generator, at::kFloat);
    }
    const auto timesteps = srds::ddim_grid(e.schedule, r.steps);

    int64_t engine_calls = 0;
    double engine_seconds = 0.0;
    c10::InferenceMode inference;
    auto model = make_model(e, cond, uncond, scale, &engine_calls, &engine_seconds);
    srds::Result result;
    if (r.sampler == SRDS_TRT_SAMPLER_SERIAL) {
      result = srds::serial_sample(model, x, timesteps, e.schedule);
    } else if (r.sampler == SRDS_TRT_SAMPLER_SRDS) {
      result = srds::srds_sample(model, x, timesteps, e.schedule, tol, r.num_blocks, r.max_iters, e.stopping);
    } else {  // run_at_tol: the per-point threshold calibrated for the caller's tol (stopping.window_accept_tol)
      const double threshold = std::min(e.stopping.paradigms_fraction * tol, e.stopping.paradigms_cap);
      result = srds::paradigms_sample(model, x, timesteps, e.schedule, threshold, r.window, r.max_iters);
    }
    auto sample = result.sample.to(at::kFloat).contiguous();
    if (!at::isfinite(sample).all().item().toBool())
      throw srds::Error(srds::Code::NonFinite, "the sample holds NaN/Inf");
    // Everything succeeded: only now touch the caller's buffers.
    std::memcpy(out, sample.data_ptr<float>(), static_cast<size_t>(sample.numel()) * sizeof(float));
    if (report != nullptr) {
      srds_trt_report rep{};
      rep.struct_size = sizeof(rep);
      rep.sampler = r.sampler;
      rep.iterations = result.iterations;
      rep.num_blocks = result.num_blocks;
      rep.sequential_calls = result.sequential_calls;
      rep.engine_calls = engine_calls;
      rep.model_evals = result.model_evals;
      rep.residual = result.residuals.empty() ? NAN : result.residuals.back();
      rep.estimated_error = result.estimates.empty() ? NAN : result.estimates.back();
      rep.tol = r.sampler == SRDS_TRT_SAMPLER_SERIAL ? 0.0 : tol;
      rep.converged = result.converged ? 1 : 0;
      rep.cut = r.sampler != SRDS_TRT_SAMPLER_SERIAL && !result.converged ? 1 : 0;
      rep.engine_seconds = engine_seconds;
      rep.seconds = std::chrono::duration<double>(Clock::now() - begin).count();
      *report = rep;
    }
    return SRDS_TRT_OK;
  });
}

srds_trt_status srds_trt_describe_plan(srds_trt_runtime *runtime, int32_t steps, int32_t num_blocks,
                                       int32_t max_iters, char *buf, size_t buf_len, size_t *needed) {
  return guarded([&] {
    if (runtime == nullptr) invalid("srds_trt_describe_plan: runtime must not be NULL");
    if (steps < 1 || steps > kMaxSteps) invalid("steps must be an integer in [1, 8192], got " + std::to_string(steps));
    if (num_blocks < 0 || num_blocks > steps) invalid("num_blocks must be 0 (default) or in [1, steps]");
    if (max_iters < -1) invalid("max_iters must be -1 (the block count) or >= 0");
    const std::string text = srds::plan_json(*runtime->e, steps, num_blocks, max_iters);
    if (needed != nullptr) *needed = text.size() + 1;
    if (buf == nullptr || buf_len < text.size() + 1)
      invalid("buffer too small: " + std::to_string(text.size() + 1) + " bytes needed");
    std::memcpy(buf, text.c_str(), text.size() + 1);
    return SRDS_TRT_OK;
  });
}

void srds_trt_close(srds_trt_runtime *runtime) { delete runtime; }

}  // extern "C"
