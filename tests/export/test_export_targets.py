"""The export CLI against the real model registry (srds_trt.models)."""
from __future__ import annotations

import pytest

from srds_trt.cli import export as cli
models = pytest.importorskip("srds_trt.models")


def test_unknown_registry_model_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "engines"
    assert cli.main(["--model", "no-such-model", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and "digits" in lines[0]
    assert not out.exists()


def test_digits_export_through_the_registry(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx")
    try:
        models.load_unet("digits", random_weights=True)
    except (models.WeightsUnavailableError, OSError) as exc:
        pytest.skip(f"digits model files not in the package yet: {exc}")
    out = tmp_path / "engines"
    assert cli.main(["--model", "digits", "--random-weights", "--dtype", "fp32", "--max-batch", "8",
                     "--out", str(out), "--quiet"]) == 0
    folder = out / "digits"
    (key_dir,) = list(folder.iterdir())
    assert capsys.readouterr().out.strip() == str(key_dir)
    assert sorted(p.name for p in key_dir.iterdir()) == ["manifest.json", "unet.onnx", "unet.plan"]
