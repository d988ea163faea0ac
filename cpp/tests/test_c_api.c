/* The C ABI from C: open an export (SRDS_TRT_TEST_EXPORT), generate with both samplers, and check that failures
 * return a status and a message and leave the caller's buffer untouched. Exit 77 (skipped) without an export. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "srds_trt.h"

static int failures = 0;
#define CHECK(cond, what)                                                   \
  do {                                                                      \
    if (!(cond)) {                                                          \
      fprintf(stderr, "FAIL %s:%d %s (%s)\n", __FILE__, __LINE__, what,    \
              srds_trt_last_error());                                       \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

static int untouched(const float *buf, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (buf[i] != 12345.0f) return 0;
  return 1;
}

int main(void) {
  CHECK(strcmp(srds_trt_version(), "0.1.0") == 0, "version");
  srds_trt_runtime *rt = NULL;
  CHECK(srds_trt_open("/nonexistent/export", &rt) == SRDS_TRT_ARTIFACT_ERROR && rt == NULL, "missing folder refused");
  CHECK(strlen(srds_trt_last_error()) > 0 && strchr(srds_trt_last_error(), '\n') == NULL, "one-line message");
  CHECK(srds_trt_open(NULL, &rt) == SRDS_TRT_INVALID_ARGUMENT, "NULL folder refused");
  const char *dir = getenv("SRDS_TRT_TEST_EXPORT");
  if (dir == NULL || !*dir) {
    printf("SRDS_TRT_TEST_EXPORT not set: only the checks without an export ran (%d failures)\n", failures);
    return failures ? 1 : 77;
  }
  CHECK(srds_trt_open(dir, &rt) == SRDS_TRT_OK, "open the export");
  if (rt == NULL) return 1;
  srds_trt_info info;
  info.struct_size = sizeof(info);
  CHECK(srds_trt_info_get(rt, &info) == SRDS_TRT_OK, "info");
  const size_t per = (size_t)info.channels * info.height * info.width;
  float *buf = malloc(sizeof(float) * per * 2);
  int64_t classes[2] = {3, 7};
  srds_trt_request rq;
  srds_trt_report rep;
  srds_trt_report_init(&rep);

  for (int sampler = 0; sampler < 3; ++sampler) { /* serial, SRDS, ParaDiGMS */
    srds_trt_request_init(&rq);
    rq.sampler = sampler;
    rq.steps = 16;
    rq.num_images = 2;
    rq.class_ids = classes;
    rq.seed = 1;
    CHECK(srds_trt_generate(rt, &rq, buf, per * 2, &rep) == SRDS_TRT_OK, "generate");
    int finite = 1;
    for (size_t i = 0; i < per * 2; ++i) finite &= isfinite(buf[i]) && fabsf(buf[i]) < 10.0f;
    CHECK(finite, "finite sample");
    CHECK(rep.converged == 1 && rep.sequential_calls >= 1 && rep.sampler == sampler, "report");
    CHECK(sampler == 0 ? rep.iterations == -1 && rep.sequential_calls == 16 : rep.iterations >= 1, "iterations");
  }

  /* failures: status, message, nothing written */
  struct { const char *what; int field; double value; srds_trt_status want; } bad[] = {
      {"steps 0", 0, 0, SRDS_TRT_INVALID_ARGUMENT},           {"steps 9000", 0, 9000, SRDS_TRT_INVALID_ARGUMENT},
      {"sampler 7", 1, 7, SRDS_TRT_INVALID_ARGUMENT},          {"tol -1", 2, -1, SRDS_TRT_INVALID_ARGUMENT},
      {"tol inf", 2, INFINITY, SRDS_TRT_INVALID_ARGUMENT},     {"class 11", 3, 11, SRDS_TRT_INVALID_ARGUMENT},
      {"guidance 1e38 overflows", 4, 1e38, SRDS_TRT_NON_FINITE}, {"num_blocks 99", 5, 99, SRDS_TRT_INVALID_ARGUMENT},
  };
  for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); ++k) {
    srds_trt_request_init(&rq);
    rq.steps = 16;
    rq.num_images = 2;
    int64_t cls[2] = {3, 7};
    rq.class_ids = cls;
    switch (bad[k].field) {
      case 0: rq.steps = (int32_t)bad[k].value; break;
      case 1: rq.sampler = (int32_t)bad[k].value; break;
      case 2: rq.tol = bad[k].value; break;
      case 3: cls[1] = (int64_t)bad[k].value; break;
      case 4: rq.guidance_scale = bad[k].value; break;
      case 5: rq.num_blocks = (int32_t)bad[k].value; break;
    }
    for (size_t i = 0; i < per * 2; ++i) buf[i] = 12345.0f;
    srds_trt_report before = rep;
    srds_trt_status s = srds_trt_generate(rt, &rq, buf, per * 2, &rep);
    if (s != bad[k].want) fprintf(stderr, "%s: got status %d\n", bad[k].what, (int)s);
    CHECK(s == bad[k].want, bad[k].what);
    CHECK(untouched(buf, per * 2) && memcmp(&before, &rep, sizeof(rep)) == 0, "nothing written on failure");
    CHECK(strlen(srds_trt_last_error()) > 0 && strchr(srds_trt_last_error(), '\n') == NULL, "one-line message");
  }
  srds_trt_request_init(&rq);
  rq.class_ids = classes;
  CHECK(srds_trt_generate(rt, &rq, buf, per * 2, NULL) == SRDS_TRT_INVALID_ARGUMENT, "out_len must match");
  CHECK(srds_trt_generate(rt, NULL, buf, per, NULL) == SRDS_TRT_INVALID_ARGUMENT, "NULL request");
  rq.class_ids = NULL;
  CHECK(srds_trt_generate(rt, &rq, buf, per, NULL) == SRDS_TRT_INVALID_ARGUMENT, "NULL class ids");
  srds_trt_close(rt);
  srds_trt_close(NULL);
  free(buf);
  printf("c_abi: %d failures\n", failures);
  return failures ? 1 : 0;
}
