// The C++ runtime: see runtime.hpp. Each section names the Python module it mirrors; keep them in step (the
// equality tests in tests/cpp/ fail when they drift).
#include "runtime.hpp"

#include <openssl/evp.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace srds {
using json = nlohmann::json;
namespace {
constexpr const char *kManifestSchema = "srds_trt.unet-artifacts/1";
constexpr const char *kSamplerSchema = "srds_trt.sampler/1";
constexpr size_t kMaxJsonBytes = 64u << 20;

[[noreturn]] void fail(Code code, const std::string &message) { throw Error(code, message); }
}  // namespace

// ---- artifacts (srds_trt/export/artifacts.py) -------------------------------------------------------------

std::string sha256_file(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(Code::Artifact, "cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX *)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) fail(Code::Internal, "sha256 unavailable");
  std::vector<char> block(1 << 20);
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &length);
  static const char *hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

bool plain_file_name(const std::string &name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

namespace {
json read_json(const std::string &path, const std::string &what) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) fail(Code::Artifact, "no " + what + " (" + path + "): not an export folder");
  if (!S_ISREG(st.st_mode)) fail(Code::Artifact, path + " is not a regular file; refused");
  if (static_cast<size_t>(st.st_size) > kMaxJsonBytes) fail(Code::Artifact, path + " is too large for a " + what);
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  json value = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded() || !value.is_object()) fail(Code::Artifact, "cannot read " + path + ": not a JSON object");
  return value;
}

const json &field(const json &object, const std::string &name, const std::string &where) {
  auto it = object.find(name);
  if (it == object.end()) fail(Code::Artifact, "malformed manifest: " + where + name + ": missing; re-export");
  return *it;
}

std::string string_field(const json &object, const std::string &name, const std::string &where) {
  const json &value = field(object, name, where);
  if (!value.is_string()) fail(Code::Artifact, "malformed manifest: " + where + name + ": expected a string");
  return value.get<std::string>();
}

// A file an engine loads: a plain name inside the folder, listed in `files` (so its sha256 is checked below).
void check_listed(const json &files, const std::string &name, const std::string &role, const std::string &folder) {
  if (!plain_file_name(name))
    fail(Code::Artifact, folder + ": manifest names " + role + " " + json(name).dump() +
                             ", which is not a file of this folder; refused");
  if (!files.contains(name))
    fail(Code::Artifact, folder + ": " + role + " " + name + " is not listed in the manifest's files; refused");
}
}  // namespace

// ---- schedule (noise_schedule.py, solvers.py) ---------------------------------------------------------------

namespace {
at::Tensor as_grid(at::Tensor grid) {  // solvers.as_grid
  if (grid.is_floating_point()) {
    grid = grid.to(at::kDouble);
    if ((grid == grid.round()).all().item().toBool()) grid = grid.to(at::kLong);
  }
  return grid;
}
}  // namespace

at::Tensor ddim_grid(const Schedule &s, int64_t num_steps) {
  const int64_t T = s.num_train_timesteps;
  if (num_steps < 1) fail(Code::InvalidArgument, "steps must be >= 1");
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  if (num_steps > T) {
    auto fine = at::arange(num_steps, 0, -1, f64) * static_cast<double>(T - 1) / static_cast<double>(num_steps);
    auto end = at::full({1}, s.set_alpha_to_one ? -1.0 : 0.0, f64);
    return as_grid(at::cat({fine, end}));
  }
  std::vector<int64_t> t;  // diffusers DDIMScheduler.set_timesteps, numpy semantics (round half to even)
  if (s.timestep_spacing == "linspace") {
    const double stop = static_cast<double>(T - 1);
    const double step = num_steps > 1 ? stop / static_cast<double>(num_steps - 1) : 0.0;
    for (int64_t i = num_steps - 1; i >= 0; --i) {
      double y = num_steps > 1 ? static_cast<double>(i) * step : 0.0;
      if (num_steps > 1 && i == num_steps - 1) y = stop;
      t.push_back(static_cast<int64_t>(std::nearbyint(y)));
    }
  } else if (s.timestep_spacing == "leading") {
    const int64_t ratio = T / num_steps;
    for (int64_t i = num_steps - 1; i >= 0; --i) t.push_back(i * ratio + s.steps_offset);
  } else if (s.timestep_spacing == "trailing") {
    const double ratio = static_cast<double>(T) / static_cast<double>(num_steps);
    const double start = static_cast<double>(T);
    const double second = start - ratio;
    const double delta = second - start;  // numpy's arange fills start + i * (buffer[1] - buffer[0])
    const auto length = static_cast<int64_t>(std::ceil((0.0 - start) / -ratio));
    for (int64_t i = 0; i < length; ++i) {
      double y = i == 0 ? start : (i == 1 ? second : start + static_cast<double>(i) * delta);
      t.push_back(static_cast<int64_t>(std::nearbyint(y)) - 1);
    }
  } else {
    fail(Code::Artifact, "timestep_spacing " + s.timestep_spacing + " is not supported");
  }
  bool bad = static_cast<int64_t>(t.size()) != num_steps;
  for (size_t i = 0; i < t.size() && !bad; ++i) bad = t[i] < 0 || (i > 0 && t[i] >= t[i - 1]);
  if (bad)
    fail(Code::InvalidArgument, "the scheduler's '" + s.timestep_spacing + "' spacing gives an invalid " +
                                    std::to_string(num_steps) + "-step grid; choose another steps");
  int64_t end = t.back() - T / num_steps;
  if (end >= 0 || !s.set_alpha_to_one) end = std::max<int64_t>(end, 0);
  else end = -1;
  t.push_back(end);
  return at::tensor(t, at::kLong);
}

at::Tensor alphas_at(const at::Tensor &timesteps, const at::Tensor &table) {
  if (timesteps.numel() && (timesteps.min().item().toDouble() < -1 ||
                            timesteps.max().item().toDouble() > static_cast<double>(table.numel() - 1)))
    fail(Code::InvalidArgument, "timesteps must lie in [-1, " + std::to_string(table.numel() - 1) +
                                    "]: the scheduler's grid leaves the training schedule; choose another steps");
  auto clean = timesteps < 0;
  at::Tensor alphas;
  if (!timesteps.is_floating_point()) {
    alphas = at::index_select(table, 0, timesteps.clamp_min(0));
  } else {
    auto t = timesteps.clamp_min(0);
    auto lo = t.floor().to(at::kLong);
    auto hi = t.ceil().to(at::kLong);
    auto w = t - lo;
    auto log_table = table.log();
    alphas = at::where(w == 0, at::index_select(table, 0, lo),
                          ((1 - w) * at::index_select(log_table, 0, lo) + w * at::index_select(log_table, 0, hi)).exp());
  }
  return at::where(clean, at::ones_like(alphas), alphas);
}

std::pair<at::Tensor, at::Tensor> ddim_coefficients(const at::Tensor &a_from, const at::Tensor &a_to,
                                                           const std::string &prediction_type) {
  auto s_from = a_from.sqrt(), s_to = a_to.sqrt();
  auto n_from = (1 - a_from).sqrt(), n_to = (1 - a_to).sqrt();
  if (prediction_type == "epsilon") return {s_to / s_from, n_to - s_to * n_from / s_from};
  if (prediction_type == "v_prediction") return {s_to * s_from + n_to * n_from, n_to * s_from - s_to * n_from};
  fail(Code::Artifact, "prediction_type " + prediction_type + " is not supported");
}

// ---- plan (schedule.py) -------------------------------------------------------------------------------------

std::vector<int> block_bounds(int num_steps, int blocks) {
  if (blocks < 1 || blocks > num_steps)
    fail(Code::InvalidArgument, "num_blocks must be in [1, steps=" + std::to_string(num_steps) + "], got " +
                                    std::to_string(blocks));
  int base = num_steps / blocks, extra = num_steps % blocks;
  std::vector<int> bounds{0};
  for (int b = 0; b < blocks; ++b) bounds.push_back(bounds.back() + base + (b < extra ? 1 : 0));
  return bounds;
}

int pipelined_calls(int num_steps, int num_blocks, int iterations) {
  int k = std::min(iterations, num_blocks);
  auto bounds = block_bounds(num_steps, num_blocks);
  std::vector<int> sizes;
  for (int b = 0; b < num_blocks; ++b) sizes.push_back(bounds[b + 1] - bounds[b]);
  std::sort(sizes.begin(), sizes.end(), std::greater<int>());
  int total = num_blocks - k;
  for (int i = 0; i < k; ++i) total += sizes[i];
  return total;
}

int default_num_blocks(int num_steps, int iterations) {
  if (num_steps < 1) fail(Code::InvalidArgument, "steps must be >= 1");
  // Python's round() is half to even; sqrt(k * N) is never exactly half an odd integer for integer k, N.
  int guess = std::max(1, std::min(num_steps, static_cast<int>(std::nearbyint(std::sqrt(double(iterations) * num_steps)))));
  int best = -1, best_cost = 0;
  for (int b = std::max(1, guess / 2); b <= std::min(num_steps, 2 * guess); ++b) {
    int cost = pipelined_calls(num_steps, b, iterations);
    if (best < 0 || cost < best_cost) best = b, best_cost = cost;
  }
  return best;
}

Plan build_tick_plan(int num_steps, int num_blocks, int max_iters) {
  Plan plan;
  plan.bounds = block_bounds(num_steps, num_blocks > 0 ? num_blocks : default_num_blocks(num_steps));
  const int blocks = plan.num_blocks();
  const int iters = std::min(max_iters < 0 ? blocks : max_iters, blocks);
  plan.max_iters = iters;
  std::vector<int> sizes;
  for (int b = 0; b < blocks; ++b) sizes.push_back(plan.bounds[b + 1] - plan.bounds[b]);
  // _pipelined_ticks: the as-soon-as-possible list schedule.
  std::map<std::pair<int, int>, int> ready_at, fine_done;
  std::map<int, Tick> rows;
  for (int p = 0; p <= iters; ++p) ready_at[{p, 0}] = -1;
  for (int p = 0; p <= iters; ++p) {
    if (p >= 1) {
      ready_at[{p, p}] = fine_done.at({p - 1, p - 1});
      rows[ready_at[{p, p}]].ready.push_back({p, p});
    }
    for (int b = p; b < blocks; ++b) {
      int start = ready_at.at({p, b}) + 1;
      rows[start].coarse.push_back({p, b});
      if (p < iters) {
        for (int j = 0; j < sizes[b]; ++j) rows[start + j].fine.push_back({p, b, j});
        fine_done[{p, b}] = start + sizes[b] - 1;
      }
      int done = p == 0 ? start : std::max(start, fine_done.at({p - 1, b}));
      ready_at[{p, b + 1}] = done;
      rows[done].ready.push_back({p, b + 1});
    }
  }
  const int last = rows.rbegin()->first + 1;
  plan.ticks.resize(last);
  for (auto &[index, tick] : rows) {
    std::stable_sort(tick.fine.begin(), tick.fine.end(), [](const FineRow &a, const FineRow &b) {
      return std::make_pair(a.iteration, a.block) < std::make_pair(b.iteration, b.block);
    });
    plan.ticks[index].fine = tick.fine;
    plan.ticks[index].coarse = tick.coarse;
    plan.ticks[index].ready = tick.ready;
  }
  for (int p = 0; p <= iters; ++p) plan.ticks[ready_at.at({p, blocks})].completes.push_back(p);
  return plan;
}

// ---- stopping (stopping.py) -----------------------------------------------------------------------------------

double error_estimate(const std::vector<std::vector<double>> &history, const StoppingConstants &k) {
  const double inf = std::numeric_limits<double>::infinity();
  if (history.empty()) return inf;
  const auto &last = history.back();
  if (*std::max_element(last.begin(), last.end()) == 0.0) return 0.0;
  const size_t p = history.size();
  if (p < 2) return inf;
  const auto &prev = history[p - 2];
  double c = last.back(), c_prev = prev.back();
  double interior = 0.0, interior_prev = 0.0;
  for (size_t i = p; i < last.size(); ++i) interior = std::max(interior, last[i]);
  for (size_t i = p - 1; i < prev.size(); ++i) interior_prev = std::max(interior_prev, prev[i]);
  if (c_prev == 0.0 || c >= c_prev || interior > k.interior_contraction * interior_prev) return inf;
  double rho = c / c_prev;
  double tail = c * rho / (1.0 - rho);
  return std::max(rho <= k.fast_contraction ? tail : std::max(c, tail), k.interior_weight * interior);
}

bool StoppingRule::observe(int iteration, const std::vector<double> &changes) {
  if (iteration != static_cast<int>(residuals.size()) + 1) fail(Code::Internal, "iterations observed out of order");
  if (static_cast<int>(changes.size()) != num_blocks) fail(Code::Internal, "wrong number of boundary changes");
  double residual = *std::max_element(changes.begin(), changes.end());
  if (!std::isfinite(residual))
    fail(Code::NonFinite, "iteration " + std::to_string(iteration) +
                              ": NaN/Inf in the sampler state (fp16 overflow, a model returning NaN, or a guidance "
                              "scale that overflows)");
  history.push_back(changes);
  residuals.push_back(residual);
  estimates.push_back(error_estimate(history, k));
  return converged();
}

bool StoppingRule::converged() const {
  const int p = static_cast<int>(residuals.size());
  return p > 0 && (p >= num_blocks || (tol > 0 && estimates.back() <= tol) || estimates.back() == 0.0);
}

// ---- samplers (sampling.py) -----------------------------------------------------------------------------------

namespace {
at::Tensor per_row(const at::Tensor &c, const at::Tensor &like) {
  std::vector<int64_t> shape{-1};
  for (int64_t i = 1; i < like.dim(); ++i) shape.push_back(1);
  return c.to(like.dtype()).view(shape);
}

at::Tensor ddim_update(const at::Tensor &x, const at::Tensor &out, const at::Tensor &c_x,
                          const at::Tensor &c_out) {
  return per_row(c_x, x) * x + per_row(c_out, x) * out.to(x.dtype());
}

void check_finite(const at::Tensor &state, const std::string &where) {
  double m = state.abs().max().item<float>();
  if (!std::isfinite(m))
    fail(Code::NonFinite, where + ": NaN/Inf in the sampler state (fp16 overflow, a model returning NaN, or a "
                                  "guidance scale that overflows)");
}

using Key = std::pair<int, int>;
}  // namespace

Result serial_sample(const Model &model, const at::Tensor &x, const at::Tensor &timesteps,
                     const Schedule &schedule) {
  auto alphas = alphas_at(timesteps, schedule.alphas_cumprod);
  const int64_t n = timesteps.size(0) - 1, batch = x.size(0);
  auto [c_x, c_out] = ddim_coefficients(alphas.slice(0, 0, n), alphas.slice(0, 1), schedule.prediction_type);
  // Cast once what Python casts at every step (same values): float32 coefficients and timesteps.
  auto cx = c_x.to(at::kFloat), cout = c_out.to(at::kFloat), ts = timesteps.to(at::kFloat);
  auto state = x.to(at::kFloat);
  for (int64_t i = 0; i < n; ++i) {
    auto out = model(state, ts[i].expand({batch}));
    state = cx[i] * state + cout[i] * out.to(state.dtype());
  }
  check_finite(state, "serial sample");
  Result r;
  r.sample = state;
  r.sequential_calls = static_cast<int>(n);
  r.model_evals = n * batch;
  r.converged = true;
  return r;
}

Result srds_sample(const Model &model, const at::Tensor &x, const at::Tensor &timesteps,
                   const Schedule &schedule, double tol, int num_blocks, int max_iters, const StoppingConstants &k) {
  const int steps = static_cast<int>(timesteps.size(0)) - 1;
  const Plan plan = build_tick_plan(steps, num_blocks, max_iters);
  const int blocks = plan.num_blocks();
  const int64_t batch = x.size(0);
  auto alphas = alphas_at(timesteps, schedule.alphas_cumprod);
  auto [fine_cx, fine_cout] = ddim_coefficients(alphas.slice(0, 0, steps), alphas.slice(0, 1), schedule.prediction_type);
  std::vector<int64_t> starts(plan.bounds.begin(), plan.bounds.end() - 1), ends(plan.bounds.begin() + 1, plan.bounds.end());
  auto [coarse_cx, coarse_cout] = ddim_coefficients(at::index_select(alphas, 0, at::tensor(starts)),
                                                    at::index_select(alphas, 0, at::tensor(ends)), schedule.prediction_type);
  auto x0 = x.to(at::kFloat);
  std::map<Key, at::Tensor> U, F, G;
  StoppingRule rule{tol, blocks, k, {}, {}, {}};
  Result result;
  result.num_blocks = blocks;
  result.tol = tol;
  auto boundary = [&](int p, int b) -> const at::Tensor & { return b == 0 ? x0 : U.at({p, b}); };
  auto finish = [&](int p, int calls) {
    result.sample = U.at({p, blocks});
    result.iterations = p;
    result.sequential_calls = calls;
    result.residuals = rule.residuals;
    result.estimates = rule.estimates;
    result.converged = p > 0 && rule.converged();
    return result;
  };
  for (size_t tick_index = 0; tick_index < plan.ticks.size(); ++tick_index) {
    const Tick &tick = plan.ticks[tick_index];
    std::vector<at::Tensor> inputs, step_from, cxs, couts;
    std::vector<std::pair<std::map<Key, at::Tensor> *, Key>> keys;
    for (const auto &r : tick.fine) {
      Key key{r.iteration, r.block};
      inputs.push_back(r.step == 0 ? boundary(key.first, key.second) : F.at(key));
      int step = plan.bounds[r.block] + r.step;
      step_from.push_back(timesteps[step]);
      cxs.push_back(fine_cx[step]);
      couts.push_back(fine_cout[step]);
      keys.push_back({&F, key});
    }
    for (const auto &r : tick.coarse) {
      Key key{r.iteration, r.block};
      inputs.push_back(boundary(key.first, key.second));
      step_from.push_back(timesteps[plan.bounds[r.block]]);
      cxs.push_back(coarse_cx[r.block]);
      couts.push_back(coarse_cout[r.block]);
      keys.push_back({&G, key});
    }
    auto state = at::cat(inputs);
    auto t = at::stack(step_from).repeat_interleave(batch);
    auto out = model(state, t);
    result.model_evals += state.size(0);
    auto updated = ddim_update(state, out, at::stack(cxs).repeat_interleave(batch),
                               at::stack(couts).repeat_interleave(batch));
    auto chunks = updated.split(batch);
    for (size_t i = 0; i < keys.size(); ++i) (*keys[i].first)[keys[i].second] = chunks[i];

    for (const auto &[p, b] : tick.ready) {
      if (p == 0) U[{0, b}] = G.at({0, b - 1});
      else if (b == p) U[{p, b}] = F.at({p - 1, b - 1});
      else U[{p, b}] = G.at({p, b - 1}) + (F.at({p - 1, b - 1}) - G.at({p - 1, b - 1}));  // parareal_update
    }
    for (int p : tick.completes) {
      if (p == 0) {
        check_finite(U.at({0, blocks}), "iteration 0 (the coarse sample)");
        continue;
      }
      std::vector<double> changes(static_cast<size_t>(p - 1), 0.0);
      for (int b = p; b <= blocks; ++b)
        changes.push_back(static_cast<double>((U.at({p, b}) - U.at({p - 1, b})).abs().max().item<float>()));
      bool stop = rule.observe(p, changes);
      for (auto *table : {&U, &F, &G})  // _forget_iteration(p - 1)
        for (auto it = table->begin(); it != table->end();)
          it = it->first.first == p - 1 ? table->erase(it) : std::next(it);
      if (stop || p == plan.max_iters) return finish(p, static_cast<int>(tick_index) + 1);
    }
  }
  // Only reached with max_iters = 0: the coarse sample itself.
  for (size_t i = 0; i < plan.ticks.size(); ++i)
    for (int p : plan.ticks[i].completes)
      if (p == 0) return finish(0, static_cast<int>(i) + 1);
  fail(Code::Internal, "plan ended without completing iteration 0");
}

Result paradigms_sample(const Model &model, const at::Tensor &x, const at::Tensor &timesteps, const Schedule &schedule,
                        double threshold, int window, int max_iters) {
  const int64_t steps = timesteps.size(0) - 1, batch = x.size(0);
  const int64_t w = std::min<int64_t>(window > 0 ? window : std::max<int64_t>(1, std::llround(std::sqrt(double(steps)))), steps);
  auto alphas = alphas_at(timesteps, schedule.alphas_cumprod);
  auto [c_x, c_out] = ddim_coefficients(alphas.slice(0, 0, steps), alphas.slice(0, 1), schedule.prediction_type);
  auto drift_x = c_x - 1;
  auto a_from = alphas.slice(0, 0, steps), a_to = alphas.slice(0, 1);
  auto var = (1 - a_to) / (1 - a_from) * (1 - a_from / a_to);  // step_noise_variance
  auto thresholds = (threshold * threshold) * at::cat({var, at::zeros({1}, var.options())});
  std::vector<int64_t> reps{steps + 1};
  for (int64_t i = 0; i < x.dim(); ++i) reps.push_back(1);
  auto points = x.to(at::kFloat).unsqueeze(0).repeat(reps);
  std::vector<int64_t> view{-1, batch};
  for (int64_t i = 1; i < x.dim(); ++i) view.push_back(x.size(i));
  int64_t begin = 0, end = w;
  Result result;
  result.iterations = 0;
  while (begin < steps && (max_iters < 0 || result.iterations < max_iters)) {
    const int64_t span = end - begin;
    auto state = points.slice(0, begin, end).flatten(0, 1);
    auto out = model(state, timesteps.slice(0, begin, end).repeat_interleave(batch));
    result.model_evals += state.size(0);
    auto delta = ddim_update(state, out, drift_x.slice(0, begin, end).repeat_interleave(batch),
                             c_out.slice(0, begin, end).repeat_interleave(batch));
    auto fresh = points[begin] + delta.view(view).cumsum(0);
    auto change = fresh - points.slice(0, begin + 1, end + 1);
    auto mean_square = change.to(at::kDouble).pow(2).flatten(2).mean(-1);
    auto moved = (mean_square > thresholds.slice(0, begin + 1, end + 1).unsqueeze(1)).any(1);
    const int64_t first_moved = moved.any().item().toBool() ? moved.to(at::kInt).argmax().item().toLong() : span;
    const int64_t slide = std::min(first_moved + 1, w);
    points.slice(0, begin + 1, end + 1).copy_(fresh);
    result.iterations += 1;
    double residual = change.abs().max().item().toDouble();
    if (!std::isfinite(residual))
      fail(Code::NonFinite, "ParaDiGMS sweep " + std::to_string(result.iterations) +
                                ": NaN/Inf in the sampler state (fp16 overflow, a model returning NaN, or a guidance "
                                "scale that overflows)");
    result.residuals.push_back(residual);
    const int64_t old_end = end;
    begin += slide;
    end = std::min(begin + w, steps);
    if (end > old_end) points.slice(0, old_end + 1, end + 1).copy_(points[old_end].unsqueeze(0).expand_as(points.slice(0, old_end + 1, end + 1)));
  }
  auto final_point = points[steps];
  check_finite(final_point, "paradigms after " + std::to_string(result.iterations) + " sweeps");
  result.sample = final_point;
  result.sequential_calls = result.iterations;
  result.converged = begin >= steps;
  result.num_blocks = 0;
  return result;
}

// ---- the export ---------------------------------------------------------------------------------------------

namespace {
struct AOTIEngine : Engine {
  torch::inductor::AOTIModelPackageLoader loader;
  explicit AOTIEngine(const std::string &path) : loader(path, "model", /*run_single_threaded=*/false, 1, -1) {}
  at::Tensor run(const at::Tensor &sample, const at::Tensor &timestep, const at::Tensor &cond) override {
    return loader.run({sample, timestep, cond})[0];
  }
};

std::vector<int64_t> int_list(const json &value, const std::string &what) {
  if (!value.is_array()) fail(Code::Artifact, "malformed sampler.json: " + what + ": expected a list");
  std::vector<int64_t> out;
  for (const auto &v : value) {
    if (!v.is_number_integer()) fail(Code::Artifact, "malformed sampler.json: " + what + ": expected integers");
    out.push_back(v.get<int64_t>());
  }
  return out;
}
}  // namespace

std::unique_ptr<Export> open_export(const std::string &folder_in, EngineKind kind) {
#ifndef SRDS_TRT_WITH_TENSORRT
  if (kind == EngineKind::TensorRT)
    fail(Code::InvalidArgument, "this libsrds_trt was built without TensorRT (cmake -DSRDS_TRT_WITH_TENSORRT=ON "
                                "where TensorRT's C++ SDK is installed)");
#endif
  std::string folder = folder_in;
  while (folder.size() > 1 && folder.back() == '/') folder.pop_back();
  struct stat st {};
  if (stat(folder.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) fail(Code::Artifact, folder + " is not a folder");
  const json manifest = read_json(folder + "/manifest.json", "manifest.json");
  if (!manifest.contains("schema") || manifest["schema"] != kManifestSchema)
    fail(Code::Artifact, folder + "/manifest.json: schema " +
                             (manifest.contains("schema") ? manifest["schema"].dump() : std::string("missing")) +
                             ", this libsrds_trt reads \"" + kManifestSchema + "\"; re-export");
  const json &files = field(manifest, "files", "");
  if (!files.is_object()) fail(Code::Artifact, "malformed manifest: files: expected an object; re-export");
  if (!manifest.contains("aoti") || !manifest["aoti"].is_object())
    fail(Code::Artifact, folder + ": this export has no AOTInductor package; re-export with "
                                  "`python -m srds_trt.export ... --aoti`");
  const json &aoti = manifest["aoti"];
  const std::string package = string_field(aoti, "package", "aoti."), sampler = string_field(aoti, "sampler", "aoti.");
  // Every file any engine loads (ours, and the ONNX / TensorRT ones others load) obeys the same rule.
  check_listed(files, package, "AOTInductor package", folder);
  check_listed(files, sampler, "sampler spec", folder);
  if (manifest.contains("tensorrt") && manifest["tensorrt"].is_object() && manifest["tensorrt"].contains("plan"))
    check_listed(files, string_field(manifest["tensorrt"], "plan", "tensorrt."), "TensorRT plan", folder);
  if (manifest.contains("onnx") && manifest["onnx"].is_object()) {
    check_listed(files, string_field(manifest["onnx"], "file", "onnx."), "ONNX model", folder);
    if (manifest["onnx"].contains("external_data") && manifest["onnx"]["external_data"].is_string())
      check_listed(files, manifest["onnx"]["external_data"].get<std::string>(), "ONNX external data", folder);
  }
  for (const auto &[name, entry] : files.items()) {  // names first: nothing is read before all are known safe
    if (!plain_file_name(name))
      fail(Code::Artifact, folder + ": manifest lists " + json(name).dump() + ", which is not a file of this folder; refused");
    if (!entry.is_object() || !entry.contains("sha256") || !entry["sha256"].is_string() || !entry.contains("bytes") ||
        !entry["bytes"].is_number_integer())
      fail(Code::Artifact, "malformed manifest: files." + name + ": expected {sha256, bytes}; re-export");
  }
  for (const auto &[name, entry] : files.items()) {
    const std::string path = folder + "/" + name;
    struct stat fs {};
    if (lstat(path.c_str(), &fs) != 0 || !S_ISREG(fs.st_mode))
      fail(Code::Artifact, folder + ": " + name + " is missing or not a regular file");
    if (static_cast<int64_t>(fs.st_size) != entry["bytes"].get<int64_t>() ||
        sha256_file(path) != entry["sha256"].get<std::string>())
      fail(Code::Artifact, folder + ": " + name + " does not match its sha256 in the manifest (modified?); refused");
  }

  auto e = std::make_unique<Export>();
  e->folder = folder;
  const json spec = read_json(folder + "/" + sampler, "sampler spec");
  try {
    if (spec.value("schema", "") != kSamplerSchema)
      fail(Code::Artifact, folder + "/" + sampler + ": schema " + spec.value("schema", std::string("missing")) +
                               ", this libsrds_trt reads \"" + kSamplerSchema + "\"; re-export");
    const json &sched = spec.at("schedule");
    e->schedule.num_train_timesteps = sched.at("num_train_timesteps").get<int64_t>();
    e->schedule.timestep_spacing = sched.at("timestep_spacing").get<std::string>();
    e->schedule.steps_offset = sched.at("steps_offset").get<int64_t>();
    e->schedule.set_alpha_to_one = sched.at("set_alpha_to_one").get<bool>();
    e->schedule.prediction_type = spec.at("prediction_type").get<std::string>();
    auto alphas = sched.at("alphas_cumprod").get<std::vector<double>>();
    if (static_cast<int64_t>(alphas.size()) != e->schedule.num_train_timesteps)
      fail(Code::Artifact, "malformed sampler.json: alphas_cumprod has the wrong length");
    e->schedule.alphas_cumprod = at::tensor(alphas, at::kDouble);
    const json &stop = spec.at("stopping");
    e->stopping = {stop.at("interior_contraction").get<double>(), stop.at("fast_contraction").get<double>(),
                   stop.at("interior_weight").get<double>()};
    e->default_tol = stop.at("default_tol").get<double>();
    if (stop.contains("window_accept") && stop["window_accept"].contains("paradigms")) {
      e->stopping.paradigms_fraction = stop["window_accept"]["paradigms"].at(0).get<double>();
      e->stopping.paradigms_cap = stop["window_accept"]["paradigms"].at(1).get<double>();
    }
    const json &guide = spec.at("guidance");
    e->default_guidance = guide.at("default_scale").is_number() ? guide.at("default_scale").get<double>() : 1.0;
    const json &cond = spec.at("conditioning");
    e->conditioning = cond.at("kind").get<std::string>();
    e->cond_shape = int_list(cond.at("cond_shape"), "conditioning.cond_shape");
    if (e->conditioning == "class") {
      e->null_class = cond.at("null_class").get<int64_t>();
      e->num_classes = cond.at("num_classes").get<int64_t>();
    } else if (e->conditioning != "text") {
      fail(Code::Artifact, "malformed sampler.json: conditioning.kind must be class or text");
    }
    e->sample_shape = int_list(spec.at("sample_shape"), "sample_shape");
    if (e->sample_shape.size() != 3) fail(Code::Artifact, "malformed sampler.json: sample_shape must be [C, H, W]");
    const json &pkg = spec.at("package");
    e->max_rows = pkg.at("max_rows").get<int64_t>();
    const std::string dtype = pkg.at("dtype").get<std::string>();
    if (dtype == "fp16") e->dtype = at::kHalf;
    else if (dtype != "fp32") fail(Code::Artifact, "malformed sampler.json: package.dtype " + dtype);
    if (pkg.at("file").get<std::string>() != package)
      fail(Code::Artifact, "sampler.json names another package than the manifest; refused");
  } catch (const json::exception &exc) {
    fail(Code::Artifact, folder + "/" + sampler + ": malformed: " + exc.what() + "; re-export");
  }
#ifdef SRDS_TRT_WITH_TENSORRT
  if (kind == EngineKind::TensorRT) {
    const std::string plan = manifest.at("tensorrt").at("plan").get<std::string>();  // checked above
    e->max_rows = manifest.at("request").at("max_batch").get<int64_t>();
    e->engine = make_tensorrt_engine(folder + "/" + plan, e->conditioning == "class" ? "class_labels"
                                                                                      : "encoder_hidden_states");
    return e;
  }
#endif
  try {
    e->engine = std::make_unique<AOTIEngine>(folder + "/" + package);
  } catch (const std::exception &exc) {
    std::string what = exc.what();
    fail(Code::Engine, "cannot load " + package + ": " + what.substr(0, what.find('\n')));
  }
  return e;
}

std::string plan_json(const Export &e, int steps, int num_blocks, int max_iters) {
  auto grid = ddim_grid(e.schedule, steps);
  const Plan plan = build_tick_plan(steps, num_blocks, max_iters);
  json out;
  auto g = grid.to(at::kDouble);
  out["timesteps"] = std::vector<double>(g.data_ptr<double>(), g.data_ptr<double>() + g.numel());
  out["integer_grid"] = !grid.is_floating_point();
  auto alphas = alphas_at(grid, e.schedule.alphas_cumprod);
  auto [cx, cout] = ddim_coefficients(alphas.slice(0, 0, steps), alphas.slice(0, 1), e.schedule.prediction_type);
  out["fine_cx"] = std::vector<double>(cx.data_ptr<double>(), cx.data_ptr<double>() + cx.numel());
  out["fine_cout"] = std::vector<double>(cout.data_ptr<double>(), cout.data_ptr<double>() + cout.numel());
  out["bounds"] = plan.bounds;
  out["max_iters"] = plan.max_iters;
  json ticks = json::array();
  for (const auto &t : plan.ticks) {
    json fine = json::array(), coarse = json::array(), ready = json::array();
    for (const auto &r : t.fine) fine.push_back({r.iteration, r.block, r.step});
    for (const auto &r : t.coarse) coarse.push_back({r.iteration, r.block});
    for (const auto &[p, b] : t.ready) ready.push_back({p, b});
    ticks.push_back({{"fine", fine}, {"coarse", coarse}, {"ready", ready}, {"completes", t.completes}});
  }
  out["ticks"] = ticks;
  return out.dump();
}

}  // namespace srds
