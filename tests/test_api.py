"""The public API: module, functional form, dispatch, initialisation, dtypes and bad input."""
import contextlib
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import gemini_kernels as gk
from gemini_kernels import GeminiFusion, gemini_fusion, gemini_fusion_reference
from gemini_kernels.params import PARAM_NAMES, FusionParams, param_shapes
from helpers import make_case, rel_err


def test_state_dict_keys_are_the_published_names():
    m = GeminiFusion(64)
    assert list(m.state_dict()) == list(PARAM_NAMES)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == param_shapes(64)


def test_published_checkpoint_entries_load_strictly():
    """A published checkpoint's fusion entries (prefix stripped) load with strict=True."""
    prefix = "module.encoder.block1.0.attn."
    source = GeminiFusion(32)
    checkpoint = {"segmenter": {prefix + k: v for k, v in source.state_dict().items()}}
    checkpoint["segmenter"][prefix + "q.module.weight"] = torch.zeros(32, 32)  # not a fusion entry
    fusion_entries = {
        k[len(prefix):]: v for k, v in checkpoint["segmenter"].items()
        if k.startswith(prefix) and k[len(prefix):] in PARAM_NAMES
    }
    target = GeminiFusion(32)
    target.load_state_dict(fusion_entries, strict=True)
    for a, b in zip(target.parameters(), source.parameters()):
        assert torch.equal(a, b)


def test_published_initialisation():
    torch.manual_seed(0)
    m = GeminiFusion(256)
    judger = m.relation_judger[0]
    for w in (judger.fc1.weight, judger.fc2.weight, m.cross_attn_0_to_1.out_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    bound = math.sqrt(6.0 / (256 + 3 * 256))  # xavier_uniform on (3C, C)
    w = m.cross_attn_1_to_0.in_proj_weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    for b in (judger.fc1.bias, judger.fc2.bias, m.cross_attn_0_to_1.in_proj_bias, m.cross_attn_1_to_0.out_proj.bias):
        assert torch.count_nonzero(b) == 0
    assert abs(m.k_noise.weight.std().item() - 1.0) < 0.1 and abs(m.v_noise.weight.mean().item()) < 0.1


def test_module_functional_and_oracle_agree():
    x0, x1, params = make_case((2, 9), 48)
    m = GeminiFusion(48, backend="torch").double()
    m.load_state_dict(params.state_dict())
    ref = gemini_fusion_reference(x0, x1, params)
    for out in (m(x0, x1), gemini_fusion(x0, x1, params.state_dict(), backend="torch")):
        assert rel_err(out[0], ref[0]) == 0 and rel_err(out[1], ref[1]) == 0
    # "auto" may pick a fused backend (e.g. the host C++ path on CPU), which rounds differently.
    out = gemini_fusion(x0, x1, params, backend="auto")
    assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12


def _published_attributes(m):
    """The 14 tensors as plain attribute access reads them, in FusionParams order."""
    judger = m.relation_judger[0]
    a, b = m.cross_attn_0_to_1, m.cross_attn_1_to_0
    return [judger.fc1.weight, judger.fc1.bias, judger.fc2.weight, judger.fc2.bias, m.k_noise.weight,
            m.v_noise.weight, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
            b.in_proj_weight, b.in_proj_bias, b.out_proj.weight, b.out_proj.bias]


@pytest.mark.parametrize("change", ["none", "pruned", "parametrized", "replaced submodule"])
def test_fusion_params_reads_what_attribute_access_reads(change):
    """fusion_params reads nn.Module's dicts first (module._member): weights computed on access
    (pruning, parametrizations) and swapped submodules must still be what the module computes with."""
    torch.manual_seed(0)
    m = GeminiFusion(16, num_heads=2, backend="torch")
    if change == "pruned":
        import torch.nn.utils.prune as prune

        prune.l1_unstructured(m.relation_judger[0].fc1, "weight", amount=0.5)
    elif change == "parametrized":
        class Doubled(torch.nn.Module):
            def forward(self, w):
                return 2 * w

        import torch.nn.utils.parametrize as parametrize

        parametrize.register_parametrization(m.cross_attn_1_to_0, "in_proj_weight", Doubled())
    elif change == "replaced submodule":
        m.cross_attn_0_to_1.out_proj = torch.nn.Linear(16, 16)
    got, expected = list(m.fusion_params()), _published_attributes(m)
    assert all(torch.equal(g, e) for g, e in zip(got, expected)) and len(got) == len(expected) == 14
    if change == "pruned":
        assert (got[0] == 0).sum() == 16 * 32 // 2  # the masked weight, not weight_orig
    if change == "parametrized":
        original = m.cross_attn_1_to_0.parametrizations.in_proj_weight.original
        assert torch.equal(got[10], 2 * original)
    x0, x1 = torch.randn(3, 16), torch.randn(3, 16)
    y = m(x0, x1)
    y_ref = gemini_fusion_reference(x0, x1, FusionParams(*expected), 2)
    assert rel_err(y[0], y_ref[0]) < 1e-6 and rel_err(y[1], y_ref[1]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_output_shape_and_dtype(dtype):
    m = GeminiFusion(32).to(dtype)
    x0, x1 = torch.randn(2, 3, 4, 32, dtype=dtype), torch.randn(2, 3, 4, 32, dtype=dtype)
    y0, y1 = m(x0, x1)
    assert y0.shape == y1.shape == x0.shape and y0.dtype == y1.dtype == dtype


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_input_dtype_and_is_close(autocast_dtype):
    x0, x1, params = make_case((2, 33), 64, dtype=torch.float32)
    ref = gemini_fusion_reference(x0.double(), x1.double(), type(params)(*(p.double() for p in params)))
    with torch.autocast("cpu", dtype=autocast_dtype):
        y0, y1 = gemini_fusion(x0, x1, params)
    assert y0.dtype == y1.dtype == torch.float32
    assert rel_err(y0, ref[0]) < 2e-2 and rel_err(y1, ref[1]) < 2e-2
    # The products really ran in low precision (float32 products would be ~1e-7 off).
    assert rel_err(y0, ref[0]) > 5e-5 and rel_err(y1, ref[1]) > 5e-5


def test_non_contiguous_inputs_match_contiguous():
    x0, x1, params = make_case((6, 10), 40)
    t0, t1 = x0.transpose(0, 1).contiguous().transpose(0, 1), torch.cat([x1, x1], dim=-1)[..., :40]
    assert not t0.is_contiguous() and not t1.is_contiguous()
    ref = gemini_fusion(x0, x1, params)
    out = gemini_fusion(t0, t1, params)
    assert rel_err(out[0], ref[0]) < 1e-15 and rel_err(out[1], ref[1]) < 1e-15


@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32), (0, 5, 32)])
def test_empty_inputs_give_empty_outputs(shape):
    m = GeminiFusion(32)
    x0, x1 = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    y0, y1 = m(x0, x1)
    assert y0.shape == y1.shape == torch.Size(shape)
    (y0.sum() + y1.sum()).backward()
    assert x0.grad.shape == x0.shape and m.k_noise.weight.grad.abs().sum() == 0


_EMPTY_IN_FRESH_PROCESS = """
import sys, torch
from gemini_kernels import GeminiFusion
backend, compiled = sys.argv[1], sys.argv[2] == "1"
m = GeminiFusion(16, 4, backend=backend)
call = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
x0, x1 = torch.randn(2, 0, 16, requires_grad=True), torch.randn(2, 0, 16)
y0, y1 = call(x0, x1)
assert y0.shape == y1.shape == (2, 0, 16), (y0.shape, y1.shape)
(y0.sum() + y1.sum()).backward()
assert x0.grad.shape == x0.shape
print("ok")
"""


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_empty_inputs_in_a_fresh_process(backend, compiled):
    """The empty-input path switches to the oracle, which a fresh process that asked for another
    backend has not loaded yet (it raised KeyError: 'torch')."""
    if backend != "auto" and gk.backends.BACKENDS[backend].unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip(f"backend={backend!r} is not available on CPU here")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _EMPTY_IN_FRESH_PROCESS, backend, str(int(compiled))],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_available_backends_and_errors():
    assert "torch" in gk.available_backends("cpu")
    assert "torch" in gk.available_backends(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        GeminiFusion(16, backend="nope")(torch.randn(2, 16), torch.randn(2, 16))
    for name in ("triton", "cuda", "cpu_cpp"):
        if gk.backends.BACKENDS[name].unavailable_reason(torch.device("cpu")) is not None:
            with pytest.raises(RuntimeError, match=f"backend='{name}' is not available"):
                gemini_fusion(torch.randn(2, 16), torch.randn(2, 16), gk.random_params(16), backend=name)
    with pytest.raises(RuntimeError, match="backend='cpu_cpp' is not available for tensors on meta: it runs on "
                                           "cpu tensors; got a tensor on meta"):
        gemini_fusion(*(torch.randn(2, 16, device="meta") for _ in range(2)), gk.random_params(16, device="meta"),
                      backend="cpu_cpp")


def test_each_backend_declares_what_it_supports_and_dispatch_follows():
    """Devices, dtypes and widths are declared once per backend (backends.BACKENDS): available_backends,
    "auto" and the refusals follow from them and from each module's run-time probe."""
    for name, backend in gk.backends.BACKENDS.items():
        assert set(backend.dtypes) <= set(gk.validation.SUPPORTED_DTYPES) and backend.widths, name
        assert backend.runs_on("cpu") or backend.runs_on("cuda") or backend.devices is None, name
        for device_type, target in backend.runs_elsewhere.items():
            assert not backend.runs_on(device_type) and gk.backends.BACKENDS[target].runs_on(device_type), name
    for device_type, order in gk.backends.AUTO_ORDER.items():
        assert all(gk.backends.BACKENDS[n].runs_on(device_type) for n in order), (device_type, order)
    # A name that runs another backend on a device is resolved to it, and listed once.
    cpu = torch.device("cpu")
    if gk.backends.BACKENDS["cpu_cpp"].unavailable_reason(cpu) is None:
        assert gk.backends.resolve_backend("cuda", cpu) == "cpu_cpp" == gk.backends.resolve_backend("auto", cpu)
        assert "cpu_cpp" in gk.available_backends(cpu) and "cuda" not in gk.available_backends(cpu)
        x0, x1, params = make_case((3, 5), 16, dtype=torch.float32, seed=9)
        for a, b in zip(gemini_fusion(x0, x1, params, 4, backend="cuda"),
                        gemini_fusion(x0, x1, params, 4, backend="cpu_cpp")):
            assert torch.equal(a, b)


def test_a_backend_refuses_a_dtype_it_does_not_declare(monkeypatch):
    """The refusal names the backend, the dtype and what it supports; "auto" passes over it."""
    cpu = torch.device("cpu")
    if gk.backends.BACKENDS["cpu_cpp"].unavailable_reason(cpu) is not None:
        pytest.fail("the compiled extension is part of the build (scripts/setup_env.sh)")
    limited = dataclasses.replace(gk.backends.BACKENDS["cpu_cpp"], dtypes=(torch.float64,))
    monkeypatch.setitem(gk.backends.BACKENDS, "cpu_cpp", limited)
    x = torch.randn(2, 16)
    for name in ("cpu_cpp", "cuda"):  # "cuda" runs cpu_cpp on CPU, and is refused as it would be
        with pytest.raises(TypeError, match=rf"backend='{name}' does not support dtype torch.float32: it computes "
                                            r"in float64; got torch.float32"):
            gemini_fusion(x, x, gk.random_params(16), backend=name)
    assert gk.backends.resolve_backend("auto", cpu, torch.float64) == "cpu_cpp"
    assert gk.backends.resolve_backend("auto", cpu, torch.float32) == "torch"


def test_cuda_device_without_cuda_gives_reasons_not_errors(monkeypatch):
    """available_backends("cuda") (the README's call) on a machine with no visible CUDA device: every
    backend says why it cannot run instead of raising (the Triton probe raised AssertionError: Torch
    not compiled with CUDA enabled)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    for device in ("cuda", torch.device("cuda"), torch.device("cuda", 0)):
        assert gk.available_backends(device) == []
        for name, backend in gk.backends.BACKENDS.items():
            reason = backend.unavailable_reason(torch.device(device))
            expected = ("no CUDA device is visible (torch.cuda.is_available() is False)" if backend.runs_on("cuda")
                        else f"it runs on {' and '.join(backend.devices)} tensors; got a tensor on cuda")
            assert reason == expected, (name, reason)
    from gemini_kernels.ops import cuda_fusion
    assert cuda_fusion.unavailable_reason(torch.device("cuda")) is not None
    with pytest.raises(RuntimeError, match="backend='triton' is not available for tensors on cuda.*no CUDA device"):
        gk.backends.resolve_backend("triton", torch.device("cuda"))


# (callable producing the error, exception type, message fragment)
BAD_INPUTS = {
    "x0 not a tensor": (lambda m: m([[1.0] * 16], torch.randn(2, 16)), TypeError, "x0 must be a torch.Tensor"),
    "x1 not a tensor": (lambda m: m(torch.randn(2, 16), None), TypeError, "x1 must be a torch.Tensor"),
    "0-d input": (lambda m: m(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "at least one dimension"),
    "integer dtype": (lambda m: m(torch.ones(2, 16, dtype=torch.int64), torch.ones(2, 16, dtype=torch.int64)),
                      TypeError, "x0 must be a floating-point tensor of dtype float16, bfloat16, float32 or float64; "
                      "got dtype torch.int64"),
    "float8 inputs": (lambda m: m(torch.zeros(2, 16, dtype=torch.float8_e4m3fn),
                                  torch.zeros(2, 16, dtype=torch.float8_e4m3fn)),
                      TypeError, "x0 must be a floating-point tensor of dtype float16, bfloat16, float32 or "
                                 "float64; got dtype torch.float8_e4m3fn"),
    "wrong width": (lambda m: m(torch.randn(2, 8), torch.randn(2, 8)), ValueError,
                    r"x0 has last dimension 8 \(shape \(2, 8\)\); expected dim=16"),
    "wrong width x1": (lambda m: m(torch.randn(2, 16), torch.randn(2, 8)), ValueError, "x1 has last dimension 8"),
    "shape mismatch": (lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 6, 16)), ValueError,
                       r"x1 has shape \(2, 6, 16\) but x0 has \(2, 5, 16\)"),
    "batch mismatch": (lambda m: m(torch.randn(3, 5, 16), torch.randn(2, 5, 16)), ValueError,
                       "expected the same shape"),
    "dtype mismatch": (lambda m: m(torch.randn(2, 16), torch.randn(2, 16, dtype=torch.float64)), TypeError,
                       "x1 has dtype torch.float64 but x0 has torch.float32"),
    "params dtype": (lambda m: m(torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)),
                     TypeError, r"params\['relation_judger.0.fc1.weight'\] has dtype torch.float32"),
    "device mismatch": (lambda m: m(torch.randn(2, 16), torch.randn(2, 16, device="meta")), ValueError,
                        "x1 is on device meta but x0 is on cpu"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(case):
    call, exc, fragment = BAD_INPUTS[case]
    with pytest.raises(exc, match=fragment):
        call(GeminiFusion(16))


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        ({"dim": 30, "num_heads": 8}, ValueError, "dim=30 is not divisible by num_heads=8"),
        ({"dim": 0}, ValueError, "dim must be positive; got 0"),
        ({"dim": 16, "num_heads": 0}, ValueError, "num_heads must be positive"),
        ({"dim": 16.0}, TypeError, "dim must be an int; got float"),
    ],
)
def test_bad_construction(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        GeminiFusion(**kwargs)


def test_functional_bad_params():
    x = torch.randn(2, 16)
    p = gk.random_params(16)
    with pytest.raises(KeyError, match="params is missing"):
        gemini_fusion(x, x, {"k_noise.weight": p.k_noise})
    with pytest.raises(ValueError, match=r"params\['k_noise.weight'\] has shape \(3, 16\); expected \(2, 16\)"):
        gemini_fusion(x, x, p._replace(k_noise=torch.randn(3, 16)))
    with pytest.raises(TypeError, match="params must be a FusionParams or a mapping"):
        gemini_fusion(x, x, [1, 2])
    with pytest.raises(ValueError, match="dim=16 is not divisible by num_heads=3"):
        gemini_fusion(x, x, p, num_heads=3)


def test_torch_compile_traces_the_module_without_graph_breaks():
    """Dispatch (imports, availability probes) stays out of the graph: fullgraph=True compiles."""
    x0, x1, params = make_case((2, 5), 16, dtype=torch.float32)
    m = GeminiFusion(16, backend="auto")
    m.load_state_dict(params.state_dict())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y0, y1 = compiled(x0, x1)
    r0, r1 = m(x0, x1)
    assert rel_err(y0, r0) < 1e-6 and rel_err(y1, r1) < 1e-6


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.bool, torch.float8_e4m3fn, torch.complex64], ids=str)
@pytest.mark.parametrize("backend", gk.available_backends("cpu"))
def test_parameter_dtype_is_checked_under_autocast_too(backend, bad_dtype, autocast):
    """Under autocast the parameters may differ from the inputs in dtype, but must still be floating
    point of a supported dtype: integer / bool ones were cast silently, float8 ones failed deep inside."""
    x = torch.randn(2, 3, 16)
    params = gk.random_params(16)
    params = params._replace(k_noise=params.k_noise.to(bad_dtype))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context, pytest.raises(TypeError, match=(
            rf"params\['k_noise.weight'\] has dtype {bad_dtype}; expected a floating-point dtype "
            r"\(float16, bfloat16, float32 or float64\)")):
        gemini_fusion(x, x, params, num_heads=4, backend=backend)


@pytest.mark.parametrize("backend", gk.available_backends("cpu"))
def test_float64_is_left_alone_under_autocast(backend):
    """Autocast does not cast float64, so neither may any backend: same result as without autocast."""
    x0, x1, params = make_case((2, 7), 16)
    plain = gemini_fusion(x0, x1, params, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gemini_fusion(x0, x1, params, backend=backend)
    assert under[0].dtype == torch.float64
    assert rel_err(under[0], plain[0]) < 1e-14 and rel_err(under[1], plain[1]) < 1e-14


@pytest.mark.parametrize("backend", gk.available_backends("cpu"))
@pytest.mark.parametrize("x_dtype,param_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)],
                         ids=["float64 inputs", "float64 parameters"])
def test_float64_mixed_with_another_dtype_is_refused_under_autocast(backend, x_dtype, param_dtype):
    """Autocast casts neither float64 inputs nor float64 parameters: mixed with another dtype the
    products could not run, so the call is refused by name, as without autocast."""
    x0, x1, params = make_case((2, 7), 16, dtype=x_dtype)
    params = FusionParams(*(p.to(param_dtype) for p in params))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"params\['relation_judger.0.fc1.weight'\] has dtype .*"
                                            r"torch.autocast does not cast float64"):
            gemini_fusion(x0, x1, params, backend=backend)


@pytest.mark.parametrize("backend", [b for b in gk.available_backends("cpu") if b != "torch"])
def test_kernel_backends_refuse_forward_mode_ad(backend):
    """No kernel backend has a forward-mode formula: a jvp raises instead of a zero tangent."""
    x0, x1, params = make_case((3,), 16)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' has no forward-mode derivative"):
        torch.func.jvp(lambda a: gk.gemini_fusion(a, x1, params, 4, backend=backend)[0], (x0,), (torch.randn_like(x0),))
