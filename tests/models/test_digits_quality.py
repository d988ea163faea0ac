"""The embedded digits model is measured, not eyeballed: a classifier trained on the real digits must recognise
>= 90% of the SRDS samples of every requested class (default settings: 100 steps, the default block count, default tol and
guidance)."""

from __future__ import annotations

import numpy as np
import pytest

from srds_trt.samplers.plan import default_num_blocks
import torch
import torch.nn.functional as F

from srds_trt import SRDSPipeline

PER_CLASS = 10  # 100 SRDS samples: ~4 min on 2 shared cores (20 per class took 8.6 min)
MIN_ACCURACY = 0.9


def to_digits_features(pixels: torch.Tensor) -> np.ndarray:
    """[n, 1, 16, 16] in [-1, 1] -> [n, 64] on load_digits' 8x8, 0..16 scale (2x2 average pooling)."""
    small = F.avg_pool2d(pixels.float(), 2)
    return ((small + 1) * 8).clamp(0, 16).flatten(1).numpy()


def digits_classifier():
    """SVC on the real digits, passed through the model's own 8->16 upsampling and back (so only the
    generated content differs between training and test inputs)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8 - 1
    up = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return SVC(gamma=0.001, C=10).fit(to_digits_features(up), digits.target)


def test_classifier_recognises_real_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8 - 1
    features = to_digits_features(F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False))
    assert (digits_classifier().predict(features) == digits.target).mean() > 0.99


@pytest.mark.slow
def test_srds_digits_are_recognised_per_class():
    pipe = SRDSPipeline.from_pretrained("digits")
    out = pipe([str(d) for d in range(10)], num_images_per_prompt=PER_CLASS, generator=torch.Generator().manual_seed(0),
               progress_bar=False)
    assert out.stats["sampler"] == "srds" and out.stats["steps"] == 100 and out.stats["blocks"] == default_num_blocks(100)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in out.images])).float().unsqueeze(1) / 127.5 - 1
    predicted = digits_classifier().predict(to_digits_features(pixels))
    labels = np.repeat(np.arange(10), PER_CLASS)
    accuracy = {d: float((predicted[labels == d] == d).mean()) for d in range(10)}
    print(f"per-class accuracy {accuracy}, SRDS iterations {out.stats['iterations']}")
    assert min(accuracy.values()) >= MIN_ACCURACY, accuracy
