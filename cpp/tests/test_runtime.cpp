// Unit tests of the C++ runtime that need no export: plan, grid, stopping rule, samplers on a toy model,
// artifact refusals. Equality with the Python modules is checked through the C ABI in tests/cpp/test_c_abi.py.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime.hpp"

namespace fs = std::filesystem;
using namespace srds;

TEST(Plan, BlockBoundsAreBalancedLongerFirst) {
  EXPECT_EQ(block_bounds(10, 3), (std::vector<int>{0, 4, 7, 10}));
  EXPECT_EQ(block_bounds(5, 5), (std::vector<int>{0, 1, 2, 3, 4, 5}));
  EXPECT_THROW(block_bounds(5, 6), Error);
}

TEST(Plan, DefaultBlocksMinimisePipelinedCalls) {
  EXPECT_EQ(default_num_blocks(1024), 54);  // as schedule.py: the smallest B of the cheapest (108 calls)
  EXPECT_EQ(pipelined_calls(1024, 54, 3), 108);
  EXPECT_EQ(pipelined_calls(1024, 32, 3), 125);
}

TEST(Plan, PipelinedTicksCoverEverySegmentOnceAndCompleteInOrder) {
  for (int n : {1, 2, 7, 16, 100}) {
    Plan plan = build_tick_plan(n, 0, -1);
    int blocks = plan.num_blocks();
    std::map<std::tuple<int, int, int>, int> seen;
    std::vector<int> completed;
    for (size_t i = 0; i < plan.ticks.size(); ++i) {
      for (const auto &r : plan.ticks[i].fine) seen[{r.iteration, r.block, r.step}]++;
      for (int p : plan.ticks[i].completes) completed.push_back(p);
    }
    int expected = 0;
    for (int p = 0; p < plan.max_iters; ++p)
      for (int b = p; b < blocks; ++b) expected += plan.bounds[b + 1] - plan.bounds[b];
    EXPECT_EQ(static_cast<int>(seen.size()), expected) << "N=" << n;
    for (const auto &[key, count] : seen) EXPECT_EQ(count, 1);
    ASSERT_EQ(static_cast<int>(completed.size()), plan.max_iters + 1);
    for (int p = 0; p <= plan.max_iters; ++p) EXPECT_EQ(completed[p], p);
  }
}

TEST(Stopping, EstimateNeedsTwoContractingIterations) {
  StoppingConstants k;
  EXPECT_TRUE(std::isinf(error_estimate({{0.5, 0.5, 0.5}}, k)));
  EXPECT_EQ(error_estimate({{0.0, 0.0, 0.0}}, k), 0.0);
  // c = 0.01, c_prev = 0.1: rho 0.1, tail 0.0011..; interior (b > 2) 0.001 <= 0.25 * interior_prev
  double e = error_estimate({{0.2, 0.2, 0.1}, {0.0, 0.001, 0.01}}, k);
  EXPECT_NEAR(e, 0.01, 1e-12);
  EXPECT_TRUE(std::isinf(error_estimate({{0.2, 0.2, 0.2, 0.1}, {0.0, 0.2, 0.2, 0.01}}, k)));  // interior not shrinking
}

TEST(Stopping, NonFiniteChangeRaises) {
  StoppingRule rule{1e-3, 2, {}};
  try {
    rule.observe(1, {NAN, 0.0});
    FAIL() << "no error";
  } catch (const Error &e) {
    EXPECT_EQ(e.code, Code::NonFinite);
  }
}

namespace {
Schedule toy_schedule() {
  Schedule s;
  s.num_train_timesteps = 1000;
  auto betas = at::linspace(1e-4, 0.02, 1000, at::kDouble);
  s.alphas_cumprod = at::cumprod(1 - betas, 0);
  return s;
}
// A smooth nonlinear toy epsilon-model with per-row timesteps.
at::Tensor toy_model(const at::Tensor &x, const at::Tensor &t) {
  auto tt = t.to(at::kFloat).view({-1, 1, 1, 1}) / 1000.0;
  return at::tanh(0.8 * x) * (0.5 + tt);
}
}  // namespace

TEST(Samplers, SrdsReachesTheSerialSampleAndEveryIterateIsExactOnItsPrefix) {
  auto s = toy_schedule();
  auto x = at::randn({2, 1, 4, 4}, at::make_generator<at::CPUGeneratorImpl>(3));
  auto grid = ddim_grid(s, 25);
  auto serial = serial_sample(toy_model, x, grid, s).sample;
  Result last;
  for (int k = 1; k <= 5; ++k) {
    last = srds_sample(toy_model, x, grid, s, 0.0, 5, k, {});
    EXPECT_EQ(last.iterations, k);
  }
  EXPECT_LE((last.sample - serial).abs().max().item<float>(), 1e-5);
  EXPECT_TRUE(last.converged);
  auto coarse = srds_sample(toy_model, x, grid, s, 0.0, 5, 0, {});
  EXPECT_EQ(coarse.iterations, 0);
  EXPECT_GT((coarse.sample - serial).abs().max().item<float>(), 1e-4);  // the test can tell iterates apart
}

TEST(Samplers, NaNFromTheModelIsAnErrorNotASample) {
  auto s = toy_schedule();
  auto x = at::randn({1, 1, 4, 4});
  auto grid = ddim_grid(s, 9);
  auto nan_model = [](const at::Tensor &x, const at::Tensor &) { return x * NAN; };
  for (bool serial : {true, false}) {
    try {
      if (serial) serial_sample(nan_model, x, grid, s);
      else srds_sample(nan_model, x, grid, s, 1e-3, 3, -1, {});
      FAIL() << "no error";
    } catch (const Error &e) {
      EXPECT_EQ(e.code, Code::NonFinite);
    }
  }
}

TEST(Grid, LeadingSpacingEndsClean) {
  auto s = toy_schedule();
  auto g = ddim_grid(s, 10);
  EXPECT_EQ(g[0].item<int64_t>(), 900);
  EXPECT_EQ(g[9].item<int64_t>(), 0);
  EXPECT_EQ(g[10].item<int64_t>(), -1);
  EXPECT_TRUE(ddim_grid(s, 1024).is_floating_point());
}

TEST(Artifacts, Sha256AndPlainNames) {
  auto dir = fs::temp_directory_path() / "srds_trt_gtest_sha";
  fs::create_directories(dir);
  std::ofstream(dir / "abc") << "abc";
  EXPECT_EQ(sha256_file((dir / "abc").string()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_TRUE(plain_file_name("unet.pt2"));
  for (const char *bad : {"", ".", "..", "../evil.plan", "/etc/passwd", "a/b"}) EXPECT_FALSE(plain_file_name(bad));
  fs::remove_all(dir);
}

namespace {
// A folder whose manifest passes the schema check, with the given aoti/tensorrt names and listed files.
fs::path fake_export(const std::string &name, const nlohmann::json &aoti, const nlohmann::json &plan,
                     const nlohmann::json &files) {
  auto dir = fs::temp_directory_path() / ("srds_trt_gtest_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  nlohmann::json m{{"schema", "srds_trt.unet-artifacts/1"}, {"files", files}, {"aoti", aoti},
                   {"tensorrt", {{"plan", plan}}}};
  std::ofstream(dir / "manifest.json") << m.dump();
  return dir;
}
void expect_artifact_error(const fs::path &dir, const std::string &needle) {
  try {
    open_export(dir.string());
    FAIL() << "opened " << dir;
  } catch (const Error &e) {
    EXPECT_EQ(e.code, Code::Artifact);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}
}  // namespace

TEST(Artifacts, RefusedBeforeAnythingIsLoaded) {
  nlohmann::json aoti{{"package", "unet.pt2"}, {"sampler", "sampler.json"}};
  nlohmann::json entry{{"sha256", std::string(64, '0')}, {"bytes", 3}};
  nlohmann::json listed{{"unet.pt2", entry}, {"sampler.json", entry}, {"unet.plan", entry}};
  expect_artifact_error(fake_export("evil_plan", aoti, "../../../evil.plan", listed), "not a file of this folder");
  expect_artifact_error(fake_export("unlisted_plan", aoti, "other.plan", listed), "not listed");
  expect_artifact_error(fake_export("evil_pkg", {{"package", "../x.pt2"}, {"sampler", "sampler.json"}}, "unet.plan",
                                    listed), "not a file of this folder");
  expect_artifact_error(fake_export("missing", aoti, "unet.plan", listed), "missing");
  auto dir = fake_export("tampered", aoti, "unet.plan", listed);
  for (const char *f : {"unet.pt2", "sampler.json", "unet.plan"}) std::ofstream(dir / f) << "abc";
  expect_artifact_error(dir, "sha256");
  expect_artifact_error(fs::temp_directory_path() / "srds_trt_gtest_nothing_here", "not a folder");
}
