"""The embedded flow-matching digits model is measured like the DDIM one: the digits classifier (an SVC on the real
digits, benchmarks/cases.py) must recognise >= 90% of the samples of every class, serial flow Euler and SRDS alike
(default settings: 100 steps, default blocks, tol and guidance), through `python -m srds_trt.generate`'s pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srds_trt import SRDSPipeline

PER_CLASS = 10
MIN_ACCURACY = 0.9


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["serial", "srds"])
def test_flow_digits_are_recognised_per_class(sampler):
    from benchmarks.cases import digits_classifier, digits_features

    pipe = SRDSPipeline.from_pretrained("digits-flow")
    out = pipe([str(d) for d in range(10)], num_images_per_prompt=PER_CLASS, sampler=sampler,
               generator=torch.Generator().manual_seed(0), progress_bar=False)
    assert out.stats["steps"] == 100 and out.stats["sampler"] == sampler
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in out.images])).float().unsqueeze(1) / 127.5 - 1
    predicted = digits_classifier().predict(digits_features(pixels))
    labels = np.repeat(np.arange(10), PER_CLASS)
    accuracy = {d: float((predicted[labels == d] == d).mean()) for d in range(10)}
    print(f"{sampler}: per-class accuracy {accuracy}, iterations {out.stats.get('iterations')}")
    assert min(accuracy.values()) >= MIN_ACCURACY, accuracy
