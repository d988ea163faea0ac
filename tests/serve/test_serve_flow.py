"""A flow-matching transformer behind the OpenAI images API: a local SD3 folder (tiny, diffusers' layout, its CLIP +
T5 text encoders) served, and the official `openai` client gets the image `SRDSPipeline` makes for the same prompt,
seed and settings, with the convergence report; a size it does not make is a 400, not ignored."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
from serve_helpers import STEPS, serve  # noqa: E402
from tiny_flow import RESOLUTION, build_tiny_sd3  # noqa: E402

from srds_trt import SRDSPipeline  # noqa: E402


def test_openai_client_gets_the_pipelines_sd3_image(tmp_path):
    from srds_trt.serve import BatchConfig

    torch.set_num_threads(1)
    folder = build_tiny_sd3(tmp_path / "sd3")
    pipe = SRDSPipeline.from_pretrained(str(folder), resolution=RESOLUTION)
    with serve(pipe, BatchConfig(window_s=0.05, max_batch_images=4, max_queue=8, timeout_s=120),
               model="tiny-sd3") as (port, _):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["tiny-sd3"]
        response = client.images.generate(model="tiny-sd3", prompt="a red cat", n=1, response_format="b64_json",
                                          extra_body={"seed": 5, "steps": STEPS, "sampler": "eps-picard",
                                                      "tol": 0.01, "guidance_scale": 5.0}, size="64x64")
        with pytest.raises(openai.BadRequestError, match="'64x64'"):  # the one size it makes, never ignored
            client.images.generate(model="tiny-sd3", prompt="a red cat", size="1024x1024")
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))))
    own = pipe("a red cat", num_inference_steps=STEPS, generator=5, sampler="eps-picard", tol=0.01,
               guidance_scale=5.0, progress_bar=False)
    assert served.shape == (RESOLUTION, RESOLUTION, 3) and pipe.image_size == (RESOLUTION, RESOLUTION)
    np.testing.assert_array_equal(served, np.asarray(own.images[0]))
    report = response.model_extra["convergence"]
    assert report["sampler"] == "eps-picard" and report["converged"] is True
