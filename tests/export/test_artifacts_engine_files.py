"""Every file an engine loads is a plain file name of the export folder and listed (hashed) in the manifest;
anything else is refused on the names alone, before a byte of it is read (load_engine, verify_onnx, and the C++
runtime in tests/cpp/test_c_abi.py)."""
from __future__ import annotations

import builtins
import json
import types
from pathlib import Path

import pytest

from srds_trt.export import artifacts
from srds_trt.export.artifacts import ArtifactError, load_engine, verify_onnx
from test_artifacts_verify import FLAVOUR, VERSION, make_artifacts


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A TensorRT module whose deserialiser records what it was handed (none is installed for real here)."""
    handed: list[bytes] = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            handed.append(plan)
            return object()

    module = types.SimpleNamespace(__version__=VERSION, Runtime=Runtime,
                                   Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}))
    monkeypatch.setattr(artifacts, "tensorrt_module", lambda: (module, FLAVOUR))
    return handed


@pytest.fixture
def no_reads_outside(monkeypatch, tmp_path):
    """Fail the test if anything opens a file outside the export folder (the planted plan is there)."""
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (opened.append(str(self)), real_open(self, "rb").read())[1])
    return opened


def plant_evil_plan(tmp_path: Path) -> Path:
    evil = tmp_path / "evil.plan"
    evil.write_bytes(b"EVIL")
    return evil


def test_plan_outside_the_folder_is_refused_before_it_is_read(tmp_path, fake_tensorrt, no_reads_outside):
    evil = plant_evil_plan(tmp_path)
    folder = make_artifacts(tmp_path / "a" / "b" / "c")
    edit_manifest(folder, lambda m: m["tensorrt"].update(plan="../../../evil.plan"))
    with pytest.raises(ArtifactError, match="not a file of this folder") as info:
        load_engine(folder, target=None)
    assert "\n" not in str(info.value)
    assert fake_tensorrt == [] and str(evil) not in no_reads_outside
    assert not any("evil" in p for p in no_reads_outside)


def test_plan_left_out_of_files_is_refused_unverified(tmp_path, fake_tensorrt):
    folder = make_artifacts(tmp_path / "x")
    (folder / "unet.plan").write_bytes(b"tampered plan")  # would fail its sha256 if it were listed
    edit_manifest(folder, lambda m: m["files"].pop("unet.plan"))
    with pytest.raises(ArtifactError, match="not listed"):
        load_engine(folder, target=None)
    assert fake_tensorrt == []


def test_listed_plan_inside_the_folder_is_handed_over(tmp_path, fake_tensorrt):
    folder = make_artifacts(tmp_path / "ok")
    load_engine(folder, target=None)
    assert fake_tensorrt == [b"not really a plan"]  # the mutants above fail only for their own reason


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["tensorrt"].update(plan="/etc/passwd"), "not a file of this folder"),
    (lambda m: m["onnx"].update(file="../unet.onnx"), "not a file of this folder"),
    (lambda m: m.update(aoti={"package": "../../x.pt2", "sampler": "sampler.json"}), "not a file of this folder"),
    (lambda m: m.update(aoti={"package": "unet.pt2", "sampler": "sampler.json"}), "not listed"),
])
def test_every_engine_file_obeys_the_rule(tmp_path, edit, needle):
    folder = make_artifacts(tmp_path / "f")
    edit_manifest(folder, edit)
    with pytest.raises(ArtifactError, match=needle):
        verify_onnx(folder)
    with pytest.raises(ArtifactError, match=needle):
        artifacts.verify_artifacts(folder, flavour=FLAVOUR, version=VERSION, target=None)
