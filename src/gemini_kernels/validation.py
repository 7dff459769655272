"""Argument checks shared by every public entry point.

Kernels trust their inputs, so everything a kernel could crash, hang or read out of bounds on is
rejected here with a message that names the argument, what it got and what was expected.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from .params import PARAM_NAMES, FusionParams, param_shapes

# What every backend computes in (inputs, and parameters also under autocast). Other floating types
# (float8, ...) would pass a bare is_floating_point check and fail deep inside a kernel or a GEMM.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED = "float16, bfloat16, float32 or float64"


def check_width(dim, num_heads) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be positive; got {value}")
    if dim % num_heads != 0:
        raise ValueError(
            f"dim={dim} is not divisible by num_heads={num_heads}; expected dim to be a multiple of "
            f"num_heads (the head width is dim // num_heads)"
        )


def check_inputs(x0, x1, dim: int) -> None:
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (..., {dim}); got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, shape (..., {dim}); got a 0-d tensor")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor of dtype {_SUPPORTED}; got dtype {x.dtype}")
        if x.shape[-1] != dim:
            raise ValueError(
                f"{name} has last dimension {x.shape[-1]} (shape {tuple(x.shape)}); expected dim={dim}"
            )
    if x1.dtype != x0.dtype:
        raise TypeError(f"x1 has dtype {x1.dtype} but x0 has {x0.dtype}; expected the same dtype")
    if x1.device != x0.device:
        raise ValueError(f"x1 is on device {x1.device} but x0 is on {x0.device}; expected the same device")
    if x1.shape != x0.shape:
        raise ValueError(
            f"x1 has shape {tuple(x1.shape)} but x0 has {tuple(x0.shape)}; expected the same shape "
            f"(the two modalities are aligned pixel by pixel)"
        )


@functools.lru_cache(maxsize=None)
def _expected_shapes(dim: int) -> tuple:
    return tuple(param_shapes(dim).values())


def _as_expected(params: FusionParams, x: Tensor) -> bool:
    """Whether every parameter is a tensor of its expected shape on x's device in x's dtype: the common
    case, decided in about half the time of the checks that name what is wrong."""
    device, dtype = x.device, x.dtype
    for tensor, shape in zip(params, _expected_shapes(x.shape[-1])):
        if not (isinstance(tensor, Tensor) and tensor.dtype is dtype and tensor.shape == shape
                and tensor.device == device):
            return False
    return True


def check_params(params: FusionParams, x: Tensor) -> None:
    if _as_expected(params, x):
        return
    dim = x.shape[-1]
    expected = param_shapes(dim)
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
    for name, tensor in zip(PARAM_NAMES, params):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"params[{name!r}] must be a torch.Tensor; got {type(tensor).__name__}")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(tensor.shape)}; expected {expected[name]} for dim={dim}"
            )
        if tensor.device != x.device:
            raise ValueError(f"params[{name!r}] is on device {tensor.device} but x0 is on {x.device}; "
                             f"expected the same device")
        if tensor.dtype not in SUPPORTED_DTYPES:
            # Checked under autocast too, where the parameters may differ from the inputs in dtype: the
            # backends would otherwise cast integer or bool parameters silently.
            raise TypeError(
                f"params[{name!r}] has dtype {tensor.dtype}; expected a floating-point dtype ({_SUPPORTED})"
            )
        if tensor.dtype != x.dtype and not autocast:
            raise TypeError(
                f"params[{name!r}] has dtype {tensor.dtype} but x0 has {x.dtype}; expected the same dtype "
                f"(convert the module with .to({x.dtype}) or run under torch.autocast)"
            )
        if tensor.dtype != x.dtype and torch.float64 in (tensor.dtype, x.dtype):
            # Autocast leaves float64 tensors alone, so the products would mix float64 with another dtype.
            raise TypeError(
                f"params[{name!r}] has dtype {tensor.dtype} but x0 has {x.dtype}; expected the same dtype "
                f"(torch.autocast does not cast float64: convert the module with .to({x.dtype}))"
            )


def check_call(x0, x1, params: FusionParams, num_heads) -> None:
    """Everything a fusion call needs: the width (set by the parameters), the heads, both inputs and
    every parameter. Used by the public API and by the Triton backend's ops, which are public too (the
    extension's ops check their arguments in C++)."""
    width = params.fc2_weight
    if not isinstance(width, Tensor) or width.dim() != 2 or width.shape[0] != width.shape[1]:
        raise ValueError(
            f"params['relation_judger.0.fc2.weight'] must be a (dim, dim) tensor, which sets the width; "
            f"got {getattr(width, 'shape', type(width).__name__)}"
        )
    dim = width.shape[0]
    check_width(dim, num_heads)
    check_inputs(x0, x1, dim)
    check_params(params, x0)


def _transforms_of(tensors) -> set:
    """The torch.func transforms that wrap one of a call's inputs, each input named by its innermost
    one (a call on constants only runs below the transforms, untransformed, and needs no rule)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return set()
    levels = {torch._C._functorch.maybe_get_level(t) for t in tensors
              if torch._C._functorch.is_functorch_wrapped_tensor(t)}
    if not levels:
        return set()
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return {i.key() for i in retrieve_all_functorch_interpreters() if i.level() in levels}


def forward_mode_ad_in_use(tensors) -> Optional[str]:
    """The forward-mode AD a call runs under (dual tensors, or a ``torch.func.jvp`` / ``jacfwd``
    transform of one of its inputs), or None. The kernel backends have no forward-mode formula:
    through them a tangent would silently come out zero."""
    from torch._C._functorch import TransformType

    # The transform first: inside torch.func.jvp the tensors are dual too, and the message should
    # name what the caller wrote.
    if TransformType.Jvp in _transforms_of(tensors):
        return "a torch.func forward-mode transform (jvp, jacfwd, linearize)"
    # Tangents live only inside a dual level (forward_ad.dual_level); outside one, unpack_dual finds
    # none on any tensor, and asking each of the 16 costs more than a small layer's kernels.
    if getattr(_forward_ad, "_current_level", 0) < 0:
        return None
    if any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return "torch.autograd.forward_ad (dual tensors)"
    return None


def functorch_transform_in_use(tensors, lifted: bool = False) -> Optional[str]:
    """The torch.func transform, other than forward-mode ones, that transforms one of a call's inputs,
    or None. The kernel backends' ops have neither functorch rules nor batching rules: under them
    torch raised internal errors ("could not find kernel for HigherOrderOperator
    custom_function_call", "must override the setup_context staticmethod", "Batching rule not
    implemented"). ``lifted``: the tensors are an op's inputs in its Autograd kernel, where a grad
    transform has wrapped every input, constants too; there an input it transforms requires grad."""
    from torch._C._functorch import TransformType

    keys = _transforms_of(tensors)
    if TransformType.Grad in keys and (not lifted or any(t.requires_grad for t in tensors)):
        return "a torch.func reverse-mode transform (grad, grad_and_value, vjp, jacrev)"
    if TransformType.Vmap in keys:
        return "torch.func.vmap"
    return None


def refuse_unsupported_transforms(backend: str, tensors, lifted: bool = False) -> None:
    """Raises, naming the backend and the transform, when a kernel backend runs under forward-mode AD
    (see forward_mode_ad_in_use) or another torch.func transform (functorch_transform_in_use).
    Inside torch.compile's tracing there is none to detect."""
    if torch.compiler.is_compiling():
        return
    # Outside every torch.func transform and dual level, the common case, there is nothing to find:
    # said in a tenth of the time the searches below take to find nothing.
    if torch._C._functorch.peek_interpreter_stack() is None and getattr(_forward_ad, "_current_level", 0) < 0:
        return
    mode = forward_mode_ad_in_use(tensors)
    if mode is not None:
        raise RuntimeError(f"backend={backend!r} has no forward-mode derivative, and {mode} is in use: its tangents "
                           "would come out as zeros; use backend='torch' for forward-mode AD")
    transform = functorch_transform_in_use(tensors, lifted)
    if transform is not None:
        raise RuntimeError(f"backend={backend!r} does not run under {transform}: its kernels have no torch.func "
                           "rules; use backend='torch' inside torch.func transforms (or torch.autograd.grad for "
                           "gradients through this backend)")
