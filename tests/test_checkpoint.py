"""Reading checkpoint files (gemini_kernels.load_checkpoint_file): published files with NumPy scalars
load, under NumPy 1.x and 2.x names; pickles that would run code are refused before anything runs;
files that are not checkpoints give errors naming the path."""
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gemini_kernels import GeminiFusion, load_checkpoint_file
from gemini_seg import build_model, load_published_checkpoint, to_published_state_dict

README = Path(__file__).resolve().parents[1] / "README.md"
# What NumPy writes for the reconstructor of a scalar, as the GLOBAL opcode's text (module\nname).
NUMPY2_SCALAR = b"numpy._core.multiarray\nscalar"
NUMPY1_SCALAR = b"numpy.core.multiarray\nscalar"


def save_published(path, state, best_val=np.float64(51.2), epoch_start=7):
    """As the published Saver writes it: torch.save of the segmenter state_dict, the start epoch and a
    NumPy best validation score."""
    torch.save({"segmenter": state, "epoch_start": epoch_start, "best_val": best_val}, path)


def with_numpy1_names(src, dst):
    """A copy of ``src`` whose pickle names the scalar reconstructor as NumPy 1.x does."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(NUMPY2_SCALAR, NUMPY1_SCALAR)
            zout.writestr(info.filename, data)


def test_published_checkpoint_with_numpy_best_val_loads(tmp_path):
    torch.manual_seed(0)
    source = build_model("mit_b0", num_classes=40, fusion_backend="torch")
    path = tmp_path / "nyudv2_mit_b0.pth.tar"
    save_published(path, to_published_state_dict(source))
    assert "numpy._core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) \
        or "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    with pytest.raises(pickle.UnpicklingError):  # what the loaders used to do
        torch.load(path, map_location="cpu", weights_only=True)

    raw = load_checkpoint_file(path)
    assert type(raw["best_val"]) is np.float64 and raw["best_val"] == 51.2 and raw["epoch_start"] == 7
    target = build_model("mit_b0", num_classes=40, fusion_backend="torch")
    extras = load_published_checkpoint(target, str(path))
    assert extras == {"epoch_start": 7, "best_val": 51.2} and type(extras["best_val"]) is np.float64
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


@pytest.mark.parametrize("value", [np.float64(51.2), np.float32(0.5), np.int64(3), np.bool_(True)], ids=repr)
def test_numpy_scalars_under_numpy1_and_numpy2_names(tmp_path, value):
    path = tmp_path / "ck.pth.tar"
    save_published(path, {"module.w": torch.arange(4.0)}, best_val=value)
    raw = tmp_path / "ck.pth.tar"
    with zipfile.ZipFile(raw) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert NUMPY2_SCALAR in pkl or NUMPY1_SCALAR in pkl
    old = tmp_path / "numpy1.pth.tar"
    with_numpy1_names(path, old)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(old))
    for p in (path, old):
        loaded = load_checkpoint_file(p)
        assert type(loaded["best_val"]) is type(value) and loaded["best_val"] == value
        assert torch.equal(loaded["segmenter"]["module.w"], torch.arange(4.0))


def _write_marker(path):  # not importable by the restricted unpickler: refused whatever it does
    Path(path).write_text("ran")


class SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class FunctionPayload(SystemPayload):
    def __reduce__(self):
        return _write_marker, (str(self.marker),)


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload, FunctionPayload], ids=lambda c: c.__name__)
def test_reduce_payload_is_refused_and_does_not_run(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth.tar"
    torch.save({"segmenter": {"w": torch.zeros(1)}, "best_val": np.float64(1.0), "x": payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to load checkpoint file .*evil\.pth\.tar"):
        load_checkpoint_file(path)
    model = GeminiFusion(16)
    with pytest.raises(pickle.UnpicklingError, match="nothing of it was run"):
        load_published_checkpoint(model, str(path))
    assert not marker.exists()


def test_files_that_are_not_checkpoints_name_the_path(tmp_path):
    text, js, empty = tmp_path / "notes.txt", tmp_path / "ck.json", tmp_path / "empty.pth.tar"
    text.write_text("not a checkpoint\n")
    js.write_text('{"segmenter": {}}')
    empty.write_bytes(b"")
    for path in (text, js, empty):
        with pytest.raises(ValueError, match=rf"checkpoint file '{path}' is not a PyTorch checkpoint"):
            load_checkpoint_file(path)
    truncated = tmp_path / "truncated.pth.tar"
    save_published(tmp_path / "whole.pth.tar", {"w": torch.zeros(1000)})
    truncated.write_bytes((tmp_path / "whole.pth.tar").read_bytes()[:2000])
    with pytest.raises(ValueError, match=rf"checkpoint file '{truncated}' could not be read"):
        load_checkpoint_file(truncated)
    missing = tmp_path / "missing.pth.tar"
    with pytest.raises(FileNotFoundError, match=rf"checkpoint file '{missing}' does not exist"):
        load_checkpoint_file(missing)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_checkpoint_file(tmp_path)


def test_readme_loads_checkpoints_through_the_shared_loader(tmp_path):
    """The README's snippet reads a published file with load_checkpoint_file (a bare torch.load
    refuses the NumPy best_val); run it on a file written as the published Saver writes it."""
    text = README.read_text()
    assert "torch.load(" not in text
    snippet = text.split("```python", 1)[1].split("```", 1)[0]
    assert 'load_checkpoint_file("nyudv2_mit_b3.pth.tar")["segmenter"]' in snippet
    prefix = "module.encoder.block1.0.attn."
    source = GeminiFusion(64)
    save_published(tmp_path / "nyudv2_mit_b3.pth.tar", {prefix + k: v for k, v in source.state_dict().items()})
    code = snippet.replace("y0, y1 = fusion(x0, x1)", "")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope = {}
        exec(code, scope)
    finally:
        os.chdir(cwd)
    for a, b in zip(scope["fusion"].state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
