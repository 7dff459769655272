"""Pieces every Triton kernel family of the backend uses: the interpreter flag, GELU, the dot helper."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter is chosen when @triton.jit runs (at import), from TRITON_INTERPRET at that moment.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")



def _patch_interpreter_bfloat16_rounding():
    """Triton 3.6's interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest
    even), which doubles every in-kernel bfloat16 rounding error and would make the CPU tests judge
    the kernels by a rounding they never see. Under the interpreter only, round to nearest even."""
    import numpy as np
    from triton.runtime import interpreter

    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or getattr(convert, "_gemini_rne", False):
        return

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np.float32))
            return np.where(nan, np.uint16(0x7FC0), rounded).reshape(np.shape(input))
        return convert(input, input_dtype, output_dtype, rounding_mode)

    convert_float._gemini_rne = True
    interpreter._convert_float = convert_float


if INTERPRETED:
    _patch_interpreter_bfloat16_rounding()

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))


@triton.jit
def gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def mm(a, b, acc=None, INTERPRET: tl.constexpr = False, PRECISION: tl.constexpr = tl.constexpr("ieee")):
    """tl.dot with a float32 (float64 for float64 operands) accumulator.

    Triton 3.6's interpreter multiplies bfloat16 operands wrongly (as raw bits); there, the operands
    are widened first, which is exact (the tensor cores form exact products of 16-bit operands and
    sum them in float32 too). ``PRECISION`` matters for float32 operands only: "tf32" or "ieee".
    """
    if INTERPRET:
        a = a.to(tl.float32) if a.dtype != tl.float64 else a
        b = b.to(tl.float32) if b.dtype != tl.float64 else b
    out_dtype: tl.constexpr = tl.float64 if a.dtype == tl.float64 else tl.float32
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=out_dtype)
