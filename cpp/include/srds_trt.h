/* libsrds_trt: run an srds_trt export (serial DDIM, pipelined SRDS, ParaDiGMS) in process, from C, C++, Go, Rust.
 *
 * An export folder is what `python -m srds_trt.export --model digits --dtype fp32 --aoti` writes: manifest.json,
 * the UNet as an AOTInductor package (unet.pt2) and sampler.json. srds_trt_open verifies the manifest and the
 * sha256 of EVERY file it lists before anything is loaded; a file an engine loads must be listed there and be a
 * plain file name inside the folder.
 *
 * Conventions
 *   - Every function returns an srds_trt_status; SRDS_TRT_OK is 0. On failure a one-line message is available from
 *     srds_trt_last_error() in the calling thread, and NOTHING has been written into the caller's buffers.
 *   - No C++ exception crosses this boundary.
 *   - Buffers are the caller's: the sample is written into `out` only when the whole call succeeded.
 *   - Thread safety: a handle may be shared by threads; calls on ONE handle are serialised by a mutex inside it
 *     (they do not run concurrently). For parallel generation open one handle per thread. srds_trt_last_error()
 *     is per thread (thread-local), valid until the calling thread's next srds_trt_* call.
 *   - Device: this build runs the AOTInductor package on the CPU. The TensorRT engine (CMake option
 *     SRDS_TRT_WITH_TENSORRT, srds_trt_open_engine) is written against TensorRT's documented API and compiled only
 *     where TensorRT is found; it was not compiled or run on the development machine (no GPU). No CUDA build yet.
 *   - Verification reads each file before the engine loads it again by path: keep the folder writable only by
 *     whoever may change the model.
 */
#ifndef SRDS_TRT_H
#define SRDS_TRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define SRDS_TRT_API __attribute__((visibility("default")))
#else
#define SRDS_TRT_API
#endif

#define SRDS_TRT_VERSION_MAJOR 0
#define SRDS_TRT_VERSION_MINOR 1
#define SRDS_TRT_VERSION_PATCH 0

typedef enum srds_trt_status {
  SRDS_TRT_OK = 0,
  SRDS_TRT_INVALID_ARGUMENT = 1, /* a NULL pointer, an out-of-range setting, a buffer of the wrong size */
  SRDS_TRT_ARTIFACT_ERROR = 2,   /* export folder missing, tampered with, malformed, or a file outside it */
  SRDS_TRT_NON_FINITE = 3,       /* NaN/Inf reached the sampler state (e.g. an absurd guidance scale) */
  SRDS_TRT_ENGINE_ERROR = 4,     /* the engine failed to load or run */
  SRDS_TRT_INTERNAL_ERROR = 5    /* a bug: please report with the message */
} srds_trt_status;

typedef enum srds_trt_sampler {
  SRDS_TRT_SAMPLER_SERIAL = 0, /* N sequential DDIM steps: the reference */
  SRDS_TRT_SAMPLER_SRDS = 1,   /* pipelined Parareal SRDS: converges to the serial sample */
  SRDS_TRT_SAMPLER_PARADIGMS = 2 /* ParaDiGMS: Picard sweeps over a sliding window ("iterations" are sweeps) */
} srds_trt_sampler;

typedef struct srds_trt_runtime srds_trt_runtime; /* opaque */

/* What to generate. Initialise with srds_trt_request_init, then set fields. */
typedef struct srds_trt_request {
  uint32_t struct_size;    /* sizeof(srds_trt_request), set by srds_trt_request_init */
  int32_t sampler;         /* srds_trt_sampler; default SRDS */
  int32_t steps;           /* N DDIM steps, 1..8192; default 100 */
  int32_t num_images;      /* images in this call, >= 1; default 1 */
  /* conditioning: class models (digits) take one class id per image (the export's null class = unconditional);
     text models take the prompt embeddings [num_images, L, D] (float32) and the unconditional ones [L, D]. */
  const int64_t *class_ids;
  const float *embeddings;
  const float *uncond_embeddings;
  double guidance_scale;   /* classifier-free guidance; 1 = none; default: the export's (digits: 4) */
  /* initial noise x_T [num_images, C, H, W] float32, or NULL to draw it from `seed` exactly as
     `python -m srds_trt.generate --seed` does (torch.randn on a CPU generator seeded with `seed`). */
  const float *initial_noise;
  uint64_t seed;           /* default 0 */
  double tol;              /* max-abs distance to the serial sample accepted (SRDS, ParaDiGMS); 0 = run to the
                              serial sample; default: the export's (1e-3) */
  int32_t num_blocks;      /* SRDS blocks; 0 = the default (~sqrt(3N), as Python) */
  int32_t max_iters;       /* SRDS iterations / ParaDiGMS sweeps at most; -1 = no limit (SRDS: the block count,
                              which always reaches the serial sample) */
  void *cuda_stream;       /* the caller's cudaStream_t for a CUDA build; must be NULL in this (CPU) build */
  int32_t window;          /* ParaDiGMS: points per sweep; 0 = round(sqrt(N)), as Python */
} srds_trt_request;

/* What a call reached (the Python pipeline's ConvergenceReport). */
typedef struct srds_trt_report {
  uint32_t struct_size;    /* sizeof(srds_trt_report), set by the caller or srds_trt_report_init */
  int32_t sampler;         /* the sampler that ran */
  int32_t iterations;      /* Parareal iterations (SRDS) or sweeps (ParaDiGMS); -1 for serial */
  int32_t num_blocks;      /* SRDS blocks; 0 for serial */
  int32_t sequential_calls; /* batched model calls on the critical path */
  int64_t engine_calls;    /* engine invocations (a call above the package's row limit runs in chunks) */
  int64_t model_evals;     /* state rows evaluated (x2 engine rows under guidance) */
  double residual;         /* last max-abs change between iterates; NaN for serial */
  double estimated_error;  /* the SRDS stopping rule's estimate of the distance to the serial sample; else NaN */
  double tol;              /* the tol that was held (ParaDiGMS: the tol asked; its per-point threshold is derived) */
  int32_t converged;       /* 1: stopped by the rule or exactness (serial: always 1) */
  int32_t cut;             /* 1: stopped by max_iters before converging */
  double seconds;          /* wall time of the call */
  double engine_seconds;   /* of which inside the engine */
} srds_trt_report;

/* The export's sample geometry and conditioning (filled by srds_trt_info). */
typedef struct srds_trt_info {
  uint32_t struct_size;
  int32_t channels, height, width; /* one sample [C, H, W] */
  int32_t conditioning;            /* 0: class ids, 1: text embeddings */
  int32_t num_classes;             /* class models: ids 0..num_classes-1; else 0 */
  int32_t null_class;              /* class models: the unconditional id; else -1 */
  int32_t cond_length, cond_dim;   /* text models: L, D; else 0 */
  int32_t max_rows;                /* engine rows per call (larger calls run in chunks) */
  double default_guidance_scale;
  double default_tol;
} srds_trt_info;

SRDS_TRT_API const char *srds_trt_version(void); /* "0.1.0" */
SRDS_TRT_API const char *srds_trt_last_error(void); /* this thread's last failure message ("" if none) */

SRDS_TRT_API void srds_trt_request_init(srds_trt_request *request);
SRDS_TRT_API void srds_trt_report_init(srds_trt_report *report);

/* Verify `export_dir` (manifest, every file's sha256, file names inside the folder), then load the engine.
   *runtime is set only on success. */
SRDS_TRT_API srds_trt_status srds_trt_open(const char *export_dir, srds_trt_runtime **runtime);
typedef enum srds_trt_engine {
  SRDS_TRT_ENGINE_AOTINDUCTOR = 0, /* the export's unet.pt2 (CPU in this build) */
  SRDS_TRT_ENGINE_TENSORRT = 1     /* the export's TensorRT plan; only in a build with SRDS_TRT_WITH_TENSORRT */
} srds_trt_engine;

/* srds_trt_open with a choice of engine; a build without TensorRT answers SRDS_TRT_INVALID_ARGUMENT for it. */
SRDS_TRT_API srds_trt_status srds_trt_open_engine(const char *export_dir, int32_t engine, srds_trt_runtime **runtime);
SRDS_TRT_API srds_trt_status srds_trt_info_get(srds_trt_runtime *runtime, srds_trt_info *info);

/* Run the request; on success write num_images * C * H * W float32 values into out (out_len elements given)
   and, when report != NULL, the convergence report. On failure out and report are untouched. */
SRDS_TRT_API srds_trt_status srds_trt_generate(srds_trt_runtime *runtime, const srds_trt_request *request, float *out,
                                  size_t out_len, srds_trt_report *report);

/* The timestep grid and the SRDS tick plan the runtime walks for (steps, num_blocks, max_iters), as JSON, into
   buf (NUL-terminated). *needed receives the length + 1; a buf too small is SRDS_TRT_INVALID_ARGUMENT. */
SRDS_TRT_API srds_trt_status srds_trt_describe_plan(srds_trt_runtime *runtime, int32_t steps, int32_t num_blocks,
                                       int32_t max_iters, char *buf, size_t buf_len, size_t *needed);

SRDS_TRT_API void srds_trt_close(srds_trt_runtime *runtime); /* NULL is fine */

#ifdef __cplusplus
}
#endif
#endif /* SRDS_TRT_H */
