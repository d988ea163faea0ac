// The C++ runtime behind srds_trt.h: artifacts verification, the timestep grid, the SRDS tick plan, the stopping
// rule and the two samplers (serial DDIM, pipelined SRDS), over one Engine. Mirrors the Python reference path
// (srds_trt/sampling.py, schedule.py, stopping.py, solvers.py, noise_schedule.py) operation for operation, so
// that both give the same iterates; tests/cpp/test_c_abi.py checks that at every iterate.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace srds {

// Errors carry the C status they map to; nothing throws across the C boundary (c_api.cpp catches).
enum class Code { InvalidArgument = 1, Artifact = 2, NonFinite = 3, Engine = 4, Internal = 5 };

struct Error : std::runtime_error {
  Code code;
  Error(Code c, const std::string &message) : std::runtime_error(message), code(c) {}
};

// ---- artifacts -------------------------------------------------------------------------------------------
std::string sha256_file(const std::string &path);
bool plain_file_name(const std::string &name);

// ---- schedule (noise_schedule.py, solvers.py) ------------------------------------------------------------
struct Schedule {
  int64_t num_train_timesteps = 1000;
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 0;
  bool set_alpha_to_one = true;
  std::string prediction_type = "epsilon";
  at::Tensor alphas_cumprod;  // float64 [T]
};

// The N+1 grid points (long for N <= T, float64 beyond), as noise_schedule.ddim_grid.
at::Tensor ddim_grid(const Schedule &schedule, int64_t num_steps);
at::Tensor alphas_at(const at::Tensor &timesteps, const at::Tensor &alphas_cumprod);
std::pair<at::Tensor, at::Tensor> ddim_coefficients(const at::Tensor &a_from, const at::Tensor &a_to,
                                                           const std::string &prediction_type);

// ---- plan (schedule.py) -----------------------------------------------------------------------------------
struct FineRow { int iteration, block, step; };
struct CoarseRow { int iteration, block; };
struct Tick {
  std::vector<FineRow> fine;
  std::vector<CoarseRow> coarse;
  std::vector<std::pair<int, int>> ready;
  std::vector<int> completes;
};
struct Plan {
  std::vector<int> bounds;
  int max_iters = 0;
  std::vector<Tick> ticks;
  int num_blocks() const { return static_cast<int>(bounds.size()) - 1; }
};

int pipelined_calls(int num_steps, int num_blocks, int iterations);
int default_num_blocks(int num_steps, int iterations = 3);
std::vector<int> block_bounds(int num_steps, int num_blocks);
// max_iters < 0: the block count. Always the pipelined schedule (the Python default).
Plan build_tick_plan(int num_steps, int num_blocks, int max_iters);

// ---- stopping (stopping.py) ------------------------------------------------------------------------------
struct StoppingConstants {
  double interior_contraction = 0.25, fast_contraction = 0.0, interior_weight = 1.0;
  double paradigms_fraction = -1.0, paradigms_cap = -1.0;  // window_accept_tol; < 0: not in the export
};
double error_estimate(const std::vector<std::vector<double>> &history, const StoppingConstants &k);
struct StoppingRule {
  double tol;
  int num_blocks;
  StoppingConstants k;
  std::vector<double> residuals, estimates;
  std::vector<std::vector<double>> history;
  bool observe(int iteration, const std::vector<double> &changes);  // throws Error(NonFinite)
  bool converged() const;
};

// ---- samplers --------------------------------------------------------------------------------------------
// model(x[rows, C, H, W] float32, t[rows] float32) -> output [rows, C, H, W] float32 (guidance already applied).
using Model = std::function<at::Tensor(const at::Tensor &, const at::Tensor &)>;

struct Result {
  at::Tensor sample;
  int iterations = -1;  // -1: serial
  int num_blocks = 0;
  int sequential_calls = 0;
  int64_t model_evals = 0;
  std::vector<double> residuals, estimates;
  bool converged = false;
  double tol = 0.0;
};

Result serial_sample(const Model &model, const at::Tensor &x, const at::Tensor &timesteps,
                     const Schedule &schedule);
Result srds_sample(const Model &model, const at::Tensor &x, const at::Tensor &timesteps,
                   const Schedule &schedule, double tol, int num_blocks, int max_iters, const StoppingConstants &k);

// ParaDiGMS (samplers/paradigms.py): `threshold` is its per-step RMS knob (window_accept_tol of the caller's tol).
Result paradigms_sample(const Model &model, const at::Tensor &x, const at::Tensor &timesteps, const Schedule &schedule,
                        double threshold, int window, int max_iters);

// ---- the loaded export -----------------------------------------------------------------------------------
struct Engine {
  virtual ~Engine() = default;
  // sample [rows, C, H, W] (engine dtype), timestep [rows] float32, cond [rows] int64 or [rows, L, D]
  virtual at::Tensor run(const at::Tensor &sample, const at::Tensor &timestep, const at::Tensor &cond) = 0;
};

struct Export {
  std::string folder;
  Schedule schedule;
  StoppingConstants stopping;
  double default_tol = 1e-3;
  double default_guidance = 1.0;
  std::string conditioning = "class";  // class | text
  std::vector<int64_t> sample_shape;   // C, H, W
  std::vector<int64_t> cond_shape;     // (), or (L, D)
  int64_t null_class = -1, num_classes = 0;
  int64_t max_rows = 256;
  at::ScalarType dtype = at::kFloat;
  std::unique_ptr<Engine> engine;
};

enum class EngineKind { AOTInductor = 0, TensorRT = 1 };

// Verify the folder (manifest schema, each listed file: plain name, regular file, sha256) before loading anything;
// then read sampler.json and load the engine. Throws Error(Artifact | Engine | InvalidArgument).
std::unique_ptr<Export> open_export(const std::string &folder, EngineKind kind = EngineKind::AOTInductor);

#ifdef SRDS_TRT_WITH_TENSORRT
std::unique_ptr<Engine> make_tensorrt_engine(const std::string &plan_path, const std::string &cond_input);
#endif

std::string plan_json(const Export &e, int steps, int num_blocks, int max_iters);

}  // namespace srds
