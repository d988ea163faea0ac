/* Generate digits with libsrds_trt from C, into one PGM image (a row of 16x16 tiles, one per digit).
 *
 *   srds_trt_digits EXPORT_DIR OUT.pgm [--prompt 3,7] [--seed 0] [--steps 100] [--sampler srds|serial|paradigms]
 *                   [--tol 1e-3] [--guidance-scale 4]
 *
 * The image equals what `python -m srds_trt.generate` writes for the same flags (to <= 2 grey levels): the
 * initial noise comes from the same seed the same way. Exit codes: 0 done, 2 bad input or artifacts, 3 failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "srds_trt.h"

static int usage(const char *message) {
  fprintf(stderr, "error: %s\nusage: srds_trt_digits EXPORT_DIR OUT.pgm [--prompt 3,7] [--seed N] [--steps N] "
                  "[--sampler srds|serial|paradigms] [--tol X] [--guidance-scale X]\n", message);
  return 2;
}

int main(int argc, char **argv) {
  if (argc < 3) return usage("give an export folder and an output file");
  const char *export_dir = argv[1], *out_path = argv[2], *prompt = "3";
  srds_trt_request request;
  srds_trt_request_init(&request);
  for (int i = 3; i < argc; i += 2) {
    if (i + 1 >= argc) return usage("every option takes a value");
    const char *flag = argv[i], *value = argv[i + 1];
    char *end = NULL;
    if (!strcmp(flag, "--prompt")) prompt = value;
    else if (!strcmp(flag, "--seed")) request.seed = strtoull(value, &end, 10);
    else if (!strcmp(flag, "--steps")) request.steps = (int32_t)strtol(value, &end, 10);
    else if (!strcmp(flag, "--tol")) request.tol = strtod(value, &end);
    else if (!strcmp(flag, "--guidance-scale")) request.guidance_scale = strtod(value, &end);
    else if (!strcmp(flag, "--sampler")) {
      if (!strcmp(value, "srds")) request.sampler = SRDS_TRT_SAMPLER_SRDS;
      else if (!strcmp(value, "serial")) request.sampler = SRDS_TRT_SAMPLER_SERIAL;
      else if (!strcmp(value, "paradigms")) request.sampler = SRDS_TRT_SAMPLER_PARADIGMS;
      else return usage("--sampler must be srds, serial or paradigms");
    } else return usage("unknown option");
    if (end != NULL && *end != '\0') return usage("a numeric option has a non-numeric value");
  }
  int64_t classes[64];
  int n = 0;
  for (const char *p = prompt; *p; ++p) {
    if (*p == ',' || *p == ' ') continue;
    if (*p < '0' || *p > '9' || n == 64) return usage("--prompt takes up to 64 digits, e.g. 3,7");
    classes[n++] = *p - '0';
  }
  if (n == 0) return usage("--prompt is empty");
  request.num_images = n;
  request.class_ids = classes;

  srds_trt_runtime *rt = NULL;
  if (srds_trt_open(export_dir, &rt) != SRDS_TRT_OK) {
    fprintf(stderr, "error: %s\n", srds_trt_last_error());
    return 2;
  }
  srds_trt_info info;
  info.struct_size = sizeof(info);
  srds_trt_info_get(rt, &info);
  const size_t per_image = (size_t)info.channels * info.height * info.width;
  float *images = malloc(sizeof(float) * per_image * n);
  srds_trt_report report;
  srds_trt_report_init(&report);
  srds_trt_status status = srds_trt_generate(rt, &request, images, per_image * n, &report);
  if (status != SRDS_TRT_OK) {
    fprintf(stderr, "error: %s\n", srds_trt_last_error());
    free(images);
    srds_trt_close(rt);
    return status == SRDS_TRT_INVALID_ARGUMENT ? 2 : 3;
  }
  /* [-1, 1] -> 0..255 as srds_trt.images.to_pil does: round((clamp(x, -1, 1) + 1) * 127.5); tiles side by side. */
  const int h = info.height, w = info.width, width = w * n;
  unsigned char *pixels = malloc((size_t)h * width);
  for (int k = 0; k < n; ++k)
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        float v = images[k * per_image + (size_t)y * w + x];
        v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
        pixels[(size_t)y * width + k * w + x] = (unsigned char)lrintf((v + 1.0f) * 127.5f);
      }
  /* Written to a temporary file beside out_path, then renamed: never a half-written image. */
  char tmp_path[4096];
  int ok = snprintf(tmp_path, sizeof tmp_path, "%s.tmp-%ld", out_path, (long)getpid()) < (int)sizeof tmp_path;
  FILE *f = ok ? fopen(tmp_path, "wb") : NULL;
  ok = f != NULL && fprintf(f, "P5\n%d %d\n255\n", width, h) > 0 &&
       fwrite(pixels, 1, (size_t)h * width, f) == (size_t)h * width;
  if (f != NULL) ok = (fclose(f) == 0) && ok;
  if (ok) ok = rename(tmp_path, out_path) == 0;
  if (!ok && f != NULL) remove(tmp_path);
  free(pixels);
  free(images);
  srds_trt_close(rt);
  if (!ok) {
    fprintf(stderr, "error: cannot write %s\n", out_path);
    return 3;
  }
  static const char *names[] = {"serial", "srds", "paradigms"};
  printf("%s: %s, %d iterations, %d sequential calls, residual %.3g, estimated error %.3g, converged %d\n",
         out_path, names[request.sampler], report.iterations, report.sequential_calls, report.residual,
         report.estimated_error, report.converged);
  return 0;
}
