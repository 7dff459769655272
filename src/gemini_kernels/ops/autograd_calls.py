"""What every kernel backend's ops do under autograd, on a short path.

The backends register an Autograd kernel for each op by hand (``torch.library.Library.impl(...,
"Autograd")``), not through ``torch.library.register_autograd`` / ``custom_op``, whose kernels spent
50-110 us in Python on a call with gradients (pytree flattening, signature binding; bench/RESULTS.md): on a GPU a small layer's kernels
take about 0.1 ms, and these kernels run on every call.

- :class:`FastFunction`: an ``autograd.Function`` whose ``apply`` skips ``Function.apply``'s
  per-call ``inspect.signature`` binding.
- :func:`backward_op_autograd`: the Autograd kernel of a backward op, whose results have no
  derivative: below autograd when nothing requires grad, else results whose backward raises, so that
  a second derivative (a gradient penalty with ``create_graph=True``) raises instead of treating the
  gradients as constants and coming out wrong.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch


class FastFunction(torch.autograd.Function):
    """An autograd.Function whose ``apply`` skips, outside functorch transforms, what
    ``Function.apply`` does on every call for a Function with a ``setup_context``: binding the
    arguments to ``forward``'s signature with ``inspect.signature`` (some 25 us a call). Its
    ``forward`` must have no default arguments, so that the binding is the identity."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        defaults = [p.name for p in inspect.signature(cls.forward).parameters.values()
                    if p.default is not inspect.Parameter.empty]
        if defaults:
            raise TypeError(f"{cls.__name__}.forward has defaults ({', '.join(defaults)}), which FastFunction.apply "
                            "would not bind: pass every argument")

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))


def _unwrap_dead_wrappers(args):
    # What Function.apply does outside transforms: tensors left wrapped by a finished functorch
    # transform are unwrapped. Only tensors can be such wrappers.
    if any(isinstance(a, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a) for a in args):
        from torch._functorch.utils import unwrap_dead_wrappers

        return unwrap_dead_wrappers(args)
    return args


def _flatten(args):
    """The tensors of an op's arguments (tensors and lists of tensors) and how to put them back."""
    spec, tensors = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append(None)
            tensors.append(a)
        elif isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a):
            spec.append(len(a))
            tensors.extend(a)
        else:
            spec.append((a,))
    return tuple(spec), tensors


def _unflatten(spec, tensors):
    args, i = [], 0
    for s in spec:
        if s is None:
            args.append(tensors[i])
            i += 1
        elif isinstance(s, int):
            args.append(list(tensors[i:i + s]))
            i += s
        else:
            args.append(s[0])
    return args


class _NoSecondDerivative(FastFunction):
    """A backward op run where its results will be differentiated: arguments (op, message, spec,
    *tensors), results the op's, whose backward raises ``message``."""

    @staticmethod
    def forward(op, message, spec, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            return tuple(op(*_unflatten(spec, tensors)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def backward_op_autograd(op: Callable, message: str) -> Callable:
    """The Autograd kernel of ``op``, a backward op returning a list of tensors: see the module."""

    def kernel(*args):
        spec, tensors = _flatten(args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return list(_NoSecondDerivative.apply(op, message, spec, *tensors))
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel
