"""The progress bar shared by bench/run.py and the training CLI (gemini_kernels/progress.py)."""
import io
import sys
import types
from pathlib import Path

import pytest

from gemini_kernels import progress as progress_module
from gemini_kernels.progress import Progress

BENCH = Path(__file__).resolve().parents[1] / "bench"


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError


@pytest.fixture
def fake_tqdm(monkeypatch):
    bars = []

    class FakeBar:
        def __init__(self, **kwargs):
            self.kwargs, self.n, self.postfix, self.closed = kwargs, 0, "", False
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    return bars


def test_without_tqdm_a_log_gets_a_line_every_tenth_with_rate_and_eta(no_tqdm):
    out = io.StringIO()
    bar = Progress(20, label="train", file=out)
    for i in range(20):
        bar.update(f"loss {i}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12, lines
    assert all(l.startswith("train [") and " it/s " in l and " eta " in l for l in lines)
    assert lines[-1].startswith("train [" + "#" * 30 + "] 20/20") and lines[-1].endswith("loss 19")


def test_without_tqdm_a_terminal_gets_one_bar_redrawn_in_place(no_tqdm):
    out = Terminal()
    with Progress(3, file=out, unit="cell") as bar:
        for _ in range(3):
            bar.update("case")
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "3/3" in text and "cell/s" in text and "eta 00:00" in text


def test_tqdm_is_used_when_importable(fake_tqdm):
    out = Terminal()
    bar = Progress(4, label="eval", file=out, unit="cell")
    bar.update("first")
    bar.update()
    bar.close()
    (fake,) = fake_tqdm
    assert fake.kwargs["total"] == 4 and fake.kwargs["desc"] == "eval" and fake.kwargs["file"] is out
    assert fake.kwargs["unit"] == "cell" and fake.n == 2 and fake.postfix == "first" and fake.closed
    assert out.getvalue() == ""  # tqdm draws it, not the fallback


def test_disabled_prints_nothing(fake_tqdm, no_tqdm):
    out = io.StringIO()
    bar = Progress(5, file=out, enabled=False)
    bar.update("x")
    bar.close()
    assert out.getvalue() == "" and bar.done == 1


def test_the_benchmark_and_the_training_cli_use_it(no_tqdm, monkeypatch):
    from gemini_seg import train

    bar = train.progress_bar(7, True, "train")
    assert isinstance(bar, Progress) and bar.file is sys.stdout and bar.label == "train"
    assert not hasattr(train, "Progress") or train.Progress is Progress  # no second implementation

    import importlib.util
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_run_progress", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run_progress", module)
    spec.loader.exec_module(module)
    bar = module.progress_bar(3)
    assert isinstance(bar, progress_module.Progress) and bar.file is sys.stderr and bar.unit == "cell"
