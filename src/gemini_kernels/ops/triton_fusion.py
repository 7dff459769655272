"""The ``"triton"`` backend: GeminiFusion as Triton kernels with a hand-written backward.

This module is the backend's entry point and its op plumbing: ``fusion(x0, x1, params, num_heads)``,
the ops it defines with ``torch.library`` (so ``torch.compile`` traces the layer without a graph break)
and their autograd. The kernels and their launch code live in ``triton_kernels/``:

| file | what |
| --- | --- |
| ``triton_kernels/configs.py`` | the configuration table: which forward path and launch settings each width and dtype gets (read by the launchers and by the sm_90a compile check) |
| ``triton_kernels/narrow.py`` | the narrow forward: C = 16 ... 64, whole rows in registers, one launch |
| ``triton_kernels/tiled.py`` | the tiled forward: any width, one persistent launch, weight tiles streamed, rows in per-program scratch |
| ``triton_kernels/tiled_bwd.py`` | the tiled backward: input gradients and per-program weight-gradient partials in one persistent launch, and their fixed-order reduction |
| ``triton_kernels/wide_bwd.py`` | the wide backward: two row-tile kernels for the input gradients, the weight gradients as GEMMs over all pixels |
| ``triton_kernels/rows.py`` | row kernels: the per-pixel math between the GEMMs of the split forward and of the backward |
| ``triton_kernels/launch.py`` | the launchers: ``forward_rows`` / ``backward_rows`` on (N, C) rows |
| ``triton_kernels/common.py`` | GELU, the dot helper, the interpreter flag |

The math is SPEC §1 (docs/spec.md) with its exact identities. Per direction, for a pixel with self
``s`` and other ``o`` (both directions read the pre-fusion inputs)::

    h  = GELU(s W1a^T + o W1b^T + b1);   r = softmax_C(h W2^T + b2)
    q  = (s Wq^T + bq) / sqrt(dh);        key_delta   = (k_noise[d] + s - s*r) Wk^T   (the key bias cancels)
    vc = o Wv^T + bv;                     value_delta = (v_noise[d] + s - o) Wv^T
    a_j = sigmoid(q_j . key_delta_j) per head;   m = vc + a * value_delta;   y = s + m Wo^T + bo

``key_delta`` and ``value_delta`` are the differences of the two keys and values (SPEC §1's two-way
softmax and value identity); a ``g`` prefix marks a gradient (``g_key_delta`` = dL/d key_delta).

Precision: loads are upcast to float32 (float64 stays float64: the interpreter runs float64 for
gradcheck); every sum and softmax is float32 or wider.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import triton
from torch import Tensor

# The Triton release the kernels, the interpreter's rounding fix (triton_kernels/common.py) and the
# sm_90a compile check are verified with; pyproject.toml declares the same floor.
MIN_TRITON = (3, 6)


def check_triton_version(version: str) -> None:
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if found < MIN_TRITON:
        raise ImportError(f"the Triton kernels need triton >= {'.'.join(map(str, MIN_TRITON))}; "
                          f"found triton {version} (pip install 'triton>=3.6')")


# An ImportError: the backend registry reports it as the reason the backend is unavailable.
check_triton_version(triton.__version__)

from ..params import FusionParams  # noqa: E402
from ..validation import check_call, refuse_unsupported_transforms  # noqa: E402
from .autocast import like_the_oracle  # noqa: E402
from .autograd_calls import FastFunction, backward_op_autograd  # noqa: E402
from .triton_kernels.common import INTERPRETED  # noqa: E402
from .triton_kernels.launch import backward_rows, forward_rows  # noqa: E402


def unavailable_reason(device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # bf16 tl.dot and the tile shapes of the fused kernel need Ampere or newer
            return f"the Triton kernels need compute capability 8.0 or newer; {device} has {major}.{minor}"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("Triton kernels run on CPU only under the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (slow; for tests)")
    return f"Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got device {device}"


# ----------------------------------------------------------------------------------------------
# The ops: opaque to torch.compile (traced through their fake implementations), differentiable
# through the hand-written backward op.
# ----------------------------------------------------------------------------------------------


def _rows(t: Tensor, dim: int) -> Tensor:
    return t.reshape(-1, dim).contiguous()


def _fusion_fwd(x0: Tensor, x1: Tensor, params: List[Tensor], num_heads: int) -> List[Tensor]:
    """(y0, y1) for ``(..., C)`` inputs; parameters in FusionParams order, all of the inputs' dtype."""
    check_call(x0, x1, FusionParams(*params), num_heads)  # the op is public: torch.ops.gemini_kernels
    if x0.numel() == 0:
        return [x0.new_empty(x0.shape), x1.new_empty(x1.shape)]
    dim = x0.shape[-1]
    p = FusionParams(*(t.contiguous() for t in params))
    # Outputs of the inputs' shape, written in place by the kernels: not views of (N, C) rows, so
    # that callers may modify them in place under autograd, as the oracle's.
    y0, y1 = x0.new_empty(x0.shape), x1.new_empty(x1.shape)
    with torch.cuda.device(x0.device) if x0.is_cuda else contextlib.nullcontext():
        forward_rows(_rows(x0, dim), _rows(x1, dim), p, num_heads, out=(y0, y1))
    return [y0, y1]


def _fusion_fwd_fake(x0, x1, params, num_heads):
    return [x0.new_empty(x0.shape), x1.new_empty(x1.shape)]


def _fusion_bwd(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, params: List[Tensor],
                num_heads: int) -> List[Tensor]:
    """``[gx0, gx1, flat]``: the gradients of the forward op for output gradients gy0, gy1; ``flat``
    holds every parameter's gradient in FusionParams order (the backward writes them into one
    buffer; an op's outputs may not alias, so the autograd formula splits it)."""
    check_call(x0, x1, FusionParams(*params), num_heads)
    for name, g, x in (("gy0", gy0, x0), ("gy1", gy1, x1)):
        if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
            raise ValueError(f"{name} must match x{name[-1]} ({tuple(x.shape)}, {x.dtype}, {x.device}); "
                             f"got ({tuple(g.shape)}, {g.dtype}, {g.device})")
    total = sum(t.numel() for t in params)
    if x0.numel() == 0:
        return [torch.zeros_like(x0), torch.zeros_like(x1), x0.new_zeros(total)]
    dim = x0.shape[-1]
    p = FusionParams(*(t.contiguous() for t in params))
    with torch.cuda.device(x0.device) if x0.is_cuda else contextlib.nullcontext():
        gx0, gx1, flat = backward_rows(_rows(gy0, dim), _rows(gy1, dim), _rows(x0, dim), _rows(x1, dim), p,
                                       num_heads)
    return [gx0.view(x0.shape), gx1.view(x1.shape), flat]


def _fusion_bwd_fake(gy0, gy1, x0, x1, params, num_heads):
    return [x0.new_empty(x0.shape), x1.new_empty(x1.shape), x0.new_empty(sum(t.numel() for t in params))]


class _Forward(FastFunction):
    """The differentiable forward op: the parameters as trailing arguments (autograd.Function takes
    no lists of tensors). It keeps the inputs and parameters only: the backward recomputes the rest."""

    @staticmethod
    def forward(x0, x1, num_heads, *params):
        with torch._C._AutoDispatchBelowAutograd():
            return tuple(fusion_fwd_op(x0, x1, list(params), num_heads))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x0, x1, num_heads, *params = inputs
        ctx.set_materialize_grads(False)  # an unused y: zeros of its shape, below
        ctx.save_for_backward(x0, x1, *params)
        ctx.num_heads = num_heads

    @staticmethod
    def backward(ctx, grad_y0, grad_y1):
        x0, x1, *params = ctx.saved_tensors
        # Contiguous zeros (zeros_like keeps a non-contiguous x's strides, which the kernels would copy).
        gy0, gy1 = (x.new_zeros(x.shape) if g is None else g for g, x in ((grad_y0, x0), (grad_y1, x1)))
        # Through the op (its Autograd kernel refuses a derivative of these gradients), which checks its
        # arguments again: saved-tensor hooks may hand back other tensors than the forward's.
        gx0, gx1, flat = torch.ops.gemini_kernels.triton_fusion_bwd(gy0, gy1, x0, x1, params, ctx.num_heads)
        param_grads = [g.view(t.shape) for g, t in zip(flat.split([t.numel() for t in params]), params)]
        return gx0, gx1, None, *param_grads


def _fusion_fwd_autograd(x0, x1, params, num_heads):
    """The forward op's Autograd kernel (autograd_calls.py says why by hand): forward-mode AD and
    torch.func transforms refused by name, as for the public API."""
    refuse_unsupported_transforms("triton", (x0, x1, *params), lifted=True)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x0, x1, *params)):
        return list(_Forward.apply(x0, x1, num_heads, *params))
    with torch._C._AutoDispatchBelowAutograd():
        return fusion_fwd_op(x0, x1, params, num_heads)


# The ops (public: torch.ops.gemini_kernels.triton_fusion_fwd / _bwd): opaque to torch.compile, which
# traces them through their fake implementations; differentiable through the hand-written backward op.
_library = torch.library.Library("gemini_kernels", "FRAGMENT")  # kept alive: dropping it unregisters
# pt2_compliant, as torch.library.custom_op tags its ops (opcheck passes on both): torch.compile under
# only_allow_pt2_compliant_ops takes them.
_PT2 = (torch.Tag.pt2_compliant_tag,)
_library.define("triton_fusion_fwd(Tensor x0, Tensor x1, Tensor[] params, int num_heads) -> Tensor[]", tags=_PT2)
_library.define("triton_fusion_bwd(Tensor gy0, Tensor gy1, Tensor x0, Tensor x1, Tensor[] params, int num_heads) "
                "-> Tensor[]", tags=_PT2)
for _key in ("CPU", "CUDA"):
    _library.impl("triton_fusion_fwd", _fusion_fwd, _key)
    _library.impl("triton_fusion_bwd", _fusion_bwd, _key)
torch.library.register_fake("gemini_kernels::triton_fusion_fwd", _fusion_fwd_fake, lib=_library)
torch.library.register_fake("gemini_kernels::triton_fusion_bwd", _fusion_bwd_fake, lib=_library)
fusion_fwd_op = torch.ops.gemini_kernels.triton_fusion_fwd.default
fusion_bwd_op = torch.ops.gemini_kernels.triton_fusion_bwd.default
_library.impl("triton_fusion_fwd", _fusion_fwd_autograd, "Autograd")
_library.impl("triton_fusion_bwd", backward_op_autograd(
    fusion_bwd_op, "gemini_kernels: the Triton backward is not differentiable: it cannot differentiate twice "
                   "(second derivatives of GeminiFusion are available from backend='torch')"), "Autograd")


def fusion(x0: Tensor, x1: Tensor, params: FusionParams, num_heads: int):
    """The backend entry point: ``(y0, y1)`` for validated ``(..., C)`` inputs, differentiable.

    Under ``torch.autocast`` it does what the oracle does (``ops/autocast.py``).
    """
    return like_the_oracle(lambda a, b, p, h: tuple(fusion_fwd_op(a, b, p, h)), x0, x1, params, num_heads)
