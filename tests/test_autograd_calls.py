"""gemini_kernels/ops/autograd_calls.py: the short autograd path both kernel backends' ops take
(their use, gradients and refusals, is in tests/test_backend_contract.py)."""
import pytest
import torch

from gemini_kernels.ops.autograd_calls import FastFunction, _flatten, _unflatten, backward_op_autograd


def test_op_arguments_flatten_and_come_back():
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 5.0)
    args = (a, [b, c], 7, None, [])
    spec, tensors = _flatten(args)
    assert [t is u for t, u in zip(tensors, (a, b, c))] == [True] * 3 and len(tensors) == 3
    back = _unflatten(spec, tensors)
    assert back[0] is a and back[1][0] is b and back[1][1] is c and back[2:] == [7, None, []]


class _Square(FastFunction):
    @staticmethod
    def forward(x, scale):
        return x * x * scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * ctx.scale * grad, None


def test_fast_function_is_an_autograd_function():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = _Square.apply(x, 3.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, 6 * x.detach())
    assert torch.autograd.gradcheck(lambda t: _Square.apply(t, 3.0), (x,))
    # Under a torch.func transform it takes Function.apply's path (its setup_context serves functorch).
    assert torch.allclose(torch.func.grad(lambda t: _Square.apply(t, 3.0).sum())(x.detach()), 6 * x.detach())


def test_fast_function_skips_the_signature_binding_and_refuses_defaults(monkeypatch):
    import inspect

    def no_binding(*args, **kwargs):
        raise AssertionError("inspect.signature called")

    monkeypatch.setattr(inspect, "signature", no_binding)
    x = torch.randn(3, requires_grad=True)
    _Square.apply(x, 2.0).sum().backward()  # torch's Function.apply would call inspect.signature
    assert torch.allclose(x.grad, 4 * x.detach())
    monkeypatch.undo()
    with pytest.raises(TypeError, match="forward has defaults \\(scale\\)"):
        class _WithDefault(FastFunction):
            @staticmethod
            def forward(x, scale=1.0):
                return x * scale


def test_a_backward_op_kernel_refuses_a_second_derivative_only_when_asked():
    def op(gy, x, ws):
        return [gy * w * x for w in ws]

    kernel = backward_op_autograd(op, "no second derivative here")
    x = torch.randn(3, requires_grad=True)
    w = torch.randn(3)
    plain = kernel(torch.ones(3), x.detach(), [w])
    assert not plain[0].requires_grad and torch.equal(plain[0], w * x.detach())
    (out,) = kernel(torch.ones(3), x, [w])  # x requires grad: the result would be differentiated
    assert out.requires_grad and torch.equal(out, w * x.detach())
    with pytest.raises(RuntimeError, match="no second derivative here"):
        out.sum().backward()
    with torch.no_grad():
        assert not kernel(torch.ones(3), x, [w])[0].requires_grad
