"""Reading checkpoint files: :func:`load_checkpoint_file`, the one reader every checkpoint goes through.

Published GeminiFusion checkpoints (JiaDingCN/GeminiFusion ``utils/helpers.py`` ``Saver``) hold
``{"segmenter": state_dict, "epoch_start": int, "best_val": numpy.float64}``. ``torch.load`` with
``weights_only=True`` refuses them, because the NumPy scalar pickles as a call of NumPy's scalar
reconstructor (``numpy.core.multiarray.scalar`` under NumPy 1.x, ``numpy._core.multiarray.scalar``
under 2.x) on a ``numpy.dtype``; ``weights_only=False`` would run whatever a file's pickle asks for.
This reader keeps ``weights_only=True`` and allows exactly those NumPy globals besides torch's own
(tensors, numbers, strings, containers): any other global, e.g. a ``__reduce__`` payload calling
``os.system``, is still refused before it runs.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import tarfile
from typing import Any, List, Optional

import torch

__all__ = ["load_checkpoint_file", "checkpoint_file_problem", "numpy_safe_globals"]

# The byte codes of the NumPy dtypes a scalar in a checkpoint may have (bool, integers, floats).
_SCALAR_TYPE_CODES = "?bBhHiIlLqQefdg"


def numpy_safe_globals() -> List[Any]:
    """The NumPy globals a pickled NumPy scalar needs, for ``torch.serialization.safe_globals``: the
    scalar reconstructor under both of its module names, ``numpy.dtype``, and the dtype classes
    (``numpy.dtypes.Float64DType``, ...), whose state the unpickler sets. Empty without NumPy."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:  # NumPy 2.x; under 1.x numpy._core does not exist, and numpy.core warns under 2.x
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    allowed: List[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),   # what NumPy 1.x writes
        (scalar, "numpy._core.multiarray.scalar"),  # what NumPy 2.x writes
        np.dtype,
    ]
    for code in _SCALAR_TYPE_CODES:
        cls = type(np.dtype(code))
        if cls is not np.dtype and cls not in allowed:  # NumPy < 1.20 has no per-dtype classes
            allowed.append(cls)
    return allowed


def _looks_like_a_torch_file(path) -> bool:
    """torch.save writes a zip archive; torch < 1.6 (and _use_new_zipfile_serialization=False) a
    pickle, which starts with the PROTO opcode; torch < 0.4 a tar archive."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or tarfile.is_tarfile(path)


def _refusal(exc: Exception) -> str:
    # torch's message: a boilerplate paragraph, the reason (e.g. "Unsupported global: GLOBAL posix.system
    # ..."), a pointer to the docs. Keep the reason.
    parts = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    reasons = [p for p in parts if not p.startswith(("Weights only load failed", "Check the documentation",
                                                     "(1)", "(2)"))]
    return " ".join(reasons) or str(exc)


def checkpoint_file_problem(path) -> Optional[str]:
    """Why ``path`` cannot be a checkpoint file (missing, a directory, or neither a zip archive nor a
    pickle, e.g. text or JSON), or ``None``; reads its first bytes only. The checks of
    :func:`load_checkpoint_file`, for callers that want to reject a path before doing work (a CLI)."""
    name = os.fspath(path)
    if not os.path.exists(path):
        return f"checkpoint file {name!r} does not exist"
    if os.path.isdir(path):
        return f"checkpoint file {name!r} is a directory; expected a file written by torch.save"
    if not _looks_like_a_torch_file(path):
        return (f"checkpoint file {name!r} is not a PyTorch checkpoint (torch.save writes a zip archive or a "
                f"pickle; this file is neither, e.g. text or JSON)")
    return None


def load_checkpoint_file(path, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` that also accepts the NumPy scalars of published
    checkpoints (see the module docstring). Raises ``FileNotFoundError`` for a missing file,
    ``ValueError`` naming the path for a file that is not a PyTorch checkpoint (text, JSON, a truncated
    file), and ``pickle.UnpicklingError`` naming the path for one whose pickle asks for anything else
    than tensors, numbers, strings, containers and NumPy scalars (nothing of it runs)."""
    name = path  # what the messages call it: the path as given, or the file object
    if isinstance(path, (str, os.PathLike)):
        name = os.fspath(path)
        problem = checkpoint_file_problem(path)
        if problem is not None:
            if not os.path.exists(path):
                raise FileNotFoundError(problem)
            if os.path.isdir(path):
                raise IsADirectoryError(problem)
            raise ValueError(problem)
    allowed = numpy_safe_globals()
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: allowed for this call only
        scope = torch.serialization.safe_globals(allowed)
    else:  # torch 2.4: process-wide, and by each object's own name (NumPy 1.x names under NumPy 1.x)
        torch.serialization.add_safe_globals([a[0] if isinstance(a, tuple) else a for a in allowed])
        scope = contextlib.nullcontext()
    try:
        with scope:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise pickle.UnpicklingError(
                f"refusing to load checkpoint file {name!r}: it asks to call or build objects other than "
                f"tensors, numbers, strings, containers and NumPy scalars ({_refusal(exc)}); nothing of it "
                f"was run. If the file is trusted, torch.load(..., weights_only=False) reads it") from None
        raise ValueError(f"checkpoint file {name!r} could not be read as a PyTorch checkpoint: {exc}") from exc
    except (EOFError, RuntimeError, KeyError, ValueError, tarfile.TarError) as exc:
        raise ValueError(f"checkpoint file {name!r} could not be read as a PyTorch checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
