"""gemini_kernels.patch on the restated published classes (published_models.py): the published MiT /
DeLiVER Attention, the Swin block (through its BasicLayer) and a whole DeLiVER backbone give the same
outputs and weight gradients patched as with their per-batch loop, with the state_dict untouched."""
import copy

import pytest
import torch
from torch import nn

import gemini_kernels
import published_models as P
from gemini_kernels import is_patched, patch
from helpers import one_thread, randomise_, rel_err  # noqa: F401  (one_thread: an autouse fixture)

BACKENDS = gemini_kernels.available_backends("cpu")


def tokens(batch, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, c, generator=g, dtype=torch.float64) for _ in range(2)]


def run(module, inputs, seed, *args):
    """Outputs (flattened to tensors) and every parameter's gradient under a random linear loss."""
    module.zero_grad()
    inputs = [t.clone() for t in inputs]  # the published forwards assign into the lists they get
    out = module(inputs, *args)
    flat = []
    for o in (out if isinstance(out, (list, tuple)) else [out]):
        flat.extend(o if isinstance(o, (list, tuple)) else [o])
    flat = [o for o in flat if isinstance(o, torch.Tensor)]
    g = torch.Generator().manual_seed(seed)
    sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in flat).backward()
    return [o.detach() for o in flat], {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def assert_patched_equal(original, inputs, backend, *args):
    patched = copy.deepcopy(original)
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    count = patch(patched, backend=backend)
    after = patched.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    want_out, want_grads = run(original, inputs, 1, *args)
    got_out, got_grads = run(patched, inputs, 1, *args)
    tol = 1e-10 if backend == "torch" else 1e-8
    for a, b in zip(got_out, want_out):
        assert rel_err(a, b) < tol
    assert got_grads.keys() == want_grads.keys()
    for k, g in want_grads.items():
        assert rel_err(got_grads[k], g) < tol, k
    return patched, count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_mit_attention(backend, sr_ratio):
    torch.manual_seed(0)
    attn = P.Attention(32, num_heads=2, qkv_bias=True, sr_ratio=sr_ratio, n_heads=8).double()
    randomise_(attn, seed=sr_ratio)
    patched, count = assert_patched_equal(attn, tokens(3, 5 * 6, 32, seed=3), backend, 5, 6)
    assert count == 1 and is_patched(patched) and not is_patched(attn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swin_blocks_in_their_basic_layer(backend):
    """Both blocks of a stage (unshifted, shifted with the mask) on a 5x7 map (padded to 8x8 windows of
    4), and the patch merging after them."""
    torch.manual_seed(0)
    layer = P.BasicLayer(32, depth=2, num_heads=2, window_size=4, drop_path=[0.0, 0.0],
                         downsample=P.PatchMerging).double()
    randomise_(layer, seed=5)
    _, count = assert_patched_equal(layer, tokens(2, 5 * 7, 32, seed=6), backend, 5, 7)
    assert count == 2


def test_deliver_backbone_walks_the_tree():
    torch.manual_seed(0)
    backbone = P.GeminiFusionBackbone("B0", ["img", "depth", "event"], num_modal=3).double()
    randomise_(backbone, seed=7)
    g = torch.Generator().manual_seed(8)
    x = [torch.randn(2, 3, 33, 69, generator=g, dtype=torch.float64) for _ in range(3)]

    class Wrap(nn.Module):  # the backbone takes the list of images
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images)

    wrapped = Wrap(backbone)
    _, count = assert_patched_equal(wrapped, x, "torch")
    assert count == 8  # every block of every stage


def test_refusals_leave_the_model_untouched():
    with pytest.raises(ValueError, match="holds no published GeminiFusion module"):
        patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch(P.Attention(32, n_heads=8), backend="tpu")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        patch("model")

    class Unknown(nn.Module):  # the fusion parameters, but not a published forward
        def __init__(self):
            super().__init__()
            P._add_fusion(self, 16, 8)

    with pytest.raises(TypeError, match="its forward is unknown"):
        patch(Unknown())
    model = nn.ModuleList([P.Attention(32, n_heads=8), P.Attention(32, n_heads=8)])
    model[1].relation_judger[0].act = nn.GELU(approximate="tanh")
    with pytest.raises(TypeError, match=r"cannot patch 1 .*exact GELU"):
        patch(model)
    assert not is_patched(model[0])  # nothing patched when one module is refused
    assert patch(model[:1], backend="cuda") == 1 and patch(model[:1], backend="torch") == 1
    assert model[0]._gemini_kernels_backend == "torch"


def test_whole_published_models_are_found():
    """Every fused module of the published full models, wherever it sits in the tree (built on the meta
    device: the walk needs no weights)."""
    with torch.device("meta"):
        swin = P.WeTrSwin("swin_tiny", num_classes=40)
        deliver = P.DeliverGeminiFusion("GeminiFusion-B2", 25, ["img", "depth", "event", "lidar"])
    assert patch(swin) == 2 + 2 + 6 + 2
    assert all(is_patched(b) for layer in swin.encoder.body.layers for b in layer.blocks)
    assert patch(deliver, backend="torch") == 3 + 4 + 6 + 3
