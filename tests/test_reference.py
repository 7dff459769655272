"""The oracle against an independent restatement of the published forward, and its gradients."""
import pytest
import torch
from torch import nn

from gemini_kernels import FusionParams, GeminiFusion, gemini_fusion_reference
from helpers import make_case, rel_err


class PublishedMlp(nn.Module):
    """Mlp_2 of the published models/mix_transformer.py (fc1, GELU, fc2; dropout 0)."""

    def __init__(self, in_features, hidden_features, out_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PublishedFusion(nn.Module):
    """The fusion part of the published Attention.forward: a Python loop over the batch around two
    nn.MultiheadAttention modules (sequence-first), queried with a length-1 sequence (the pixel)
    against the length-2 key/value sequences [noise + self, self * relation] / [noise + self, other]."""

    def __init__(self, dim, heads=8):
        super().__init__()
        self.cross_attn_0_to_1 = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=False)
        self.cross_attn_1_to_0 = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=False)
        self.relation_judger = nn.Sequential(PublishedMlp(dim * 2, dim, dim), nn.Softmax(dim=-1))
        self.k_noise = nn.Embedding(2, dim)
        self.v_noise = nn.Embedding(2, dim)

    def forward(self, x0, x1):
        new_x0, new_x1 = [], []
        for bs in range(x0.shape[0]):
            q = x0[bs].unsqueeze(0)
            relation = self.relation_judger(torch.cat([x0[bs].unsqueeze(0), x1[bs].unsqueeze(0)], dim=-1))
            k = torch.cat([self.k_noise.weight[0] + q, torch.mul(q, relation)], dim=0)
            v = torch.cat([self.v_noise.weight[0] + q, x1[bs].unsqueeze(0)], dim=0)
            new_x0.append(x0[bs] + self.cross_attn_0_to_1(q, k, v)[0].squeeze(0))

            q = x1[bs].unsqueeze(0)
            relation = self.relation_judger(torch.cat([x1[bs].unsqueeze(0), x0[bs].unsqueeze(0)], dim=-1))
            k = torch.cat([self.k_noise.weight[1] + q, torch.mul(q, relation)], dim=0)
            v = torch.cat([self.v_noise.weight[1] + q, x0[bs].unsqueeze(0)], dim=0)
            new_x1.append(x1[bs] + self.cross_attn_1_to_0(q, k, v)[0].squeeze(0))
        return torch.stack(new_x0), torch.stack(new_x1)


def randomise(module, seed):
    """Every parameter random and non-zero (biases and noises included), sized to keep softmaxes live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1] if p.dim() == 2 and "noise" not in name else 10.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / fan_in ** 0.5)


@pytest.mark.parametrize(
    "batch, pixels, dim, heads",
    [(2, 7, 16, 8), (3, 37, 64, 8), (1, 300, 320, 8), (2, 19, 96, 4), (4, 5, 24, 3)],
)
def test_oracle_matches_published_formulation(batch, pixels, dim, heads):
    published = PublishedFusion(dim, heads).double()
    randomise(published, seed=batch * 1000 + dim)
    ours = GeminiFusion(dim, num_heads=heads, backend="torch").double()
    ours.load_state_dict(published.state_dict(), strict=True)

    g = torch.Generator().manual_seed(dim)
    x0 = torch.randn(batch, pixels, dim, generator=g, dtype=torch.float64)
    x1 = torch.randn(batch, pixels, dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref0, ref1 = published(x0, x1)
        y0, y1 = ours(x0, x1)
    # A non-trivial case: the fusion moved the outputs away from the residual.
    assert rel_err(x0, ref0) > 1e-2 and rel_err(x1, ref1) > 1e-2
    assert rel_err(y0, ref0) < 1e-12
    assert rel_err(y1, ref1) < 1e-12


def test_directions_use_their_own_parameters():
    """Swapping the inputs and the two directions' parameters swaps the outputs."""
    x0, x1, p = make_case((3, 11), 32)
    swapped = p._replace(
        k_noise=p.k_noise.flip(0), v_noise=p.v_noise.flip(0),
        in_proj_weight_0=p.in_proj_weight_1, in_proj_bias_0=p.in_proj_bias_1,
        out_proj_weight_0=p.out_proj_weight_1, out_proj_bias_0=p.out_proj_bias_1,
        in_proj_weight_1=p.in_proj_weight_0, in_proj_bias_1=p.in_proj_bias_0,
        out_proj_weight_1=p.out_proj_weight_0, out_proj_bias_1=p.out_proj_bias_0,
    )
    y0, y1 = gemini_fusion_reference(x0, x1, p)
    z1, z0 = gemini_fusion_reference(x1, x0, swapped)
    assert rel_err(z0, y0) < 1e-14 and rel_err(z1, y1) < 1e-14
    assert rel_err(y0, gemini_fusion_reference(x0, x1, p._replace(in_proj_weight_1=p.in_proj_weight_0))[0]) < 1e-14
    assert rel_err(y1, gemini_fusion_reference(x0, x1, p._replace(in_proj_weight_1=p.in_proj_weight_0))[1]) > 1e-3


def test_pixels_are_independent():
    """Any leading dimensions: the result of a pixel depends on that pixel alone."""
    x0, x1, p = make_case((2, 3, 5), 24)
    y0, y1 = gemini_fusion_reference(x0, x1, p)
    f0, f1 = gemini_fusion_reference(x0.reshape(-1, 24), x1.reshape(-1, 24), p)
    assert rel_err(f0.reshape(y0.shape), y0) < 1e-14 and rel_err(f1.reshape(y1.shape), y1) < 1e-14
    one0, one1 = gemini_fusion_reference(x0[1, 2, 4], x1[1, 2, 4], p)
    assert rel_err(one0, y0[1, 2, 4]) < 1e-14 and rel_err(one1, y1[1, 2, 4]) < 1e-14


@pytest.mark.parametrize(
    "shape, dim, heads, fast_mode",
    [((2, 3), 8, 4, False), ((5,), 12, 3, False), ((1, 2, 2), 24, 8, True), ((3,), 40, 8, True)],
)
def test_oracle_gradcheck(shape, dim, heads, fast_mode):
    """Gradients with respect to both inputs and every parameter, in float64 (fast mode, which checks
    random projections of the Jacobian, for the wider cases)."""
    x0, x1, params = make_case(shape, dim, requires_grad=True, seed=dim)

    def f(x0, x1, *params):
        return gemini_fusion_reference(x0, x1, FusionParams(*params), heads)

    assert torch.autograd.gradcheck(f, (x0, x1, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)
