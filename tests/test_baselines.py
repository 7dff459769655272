"""The benchmark's comparison formulations (gemini_kernels.baselines)."""
import math

import pytest
import torch

from gemini_kernels import gemini_fusion_reference
from gemini_kernels.baselines import PublishedFusion, full_cross_attention, random_token_exchange
from helpers import make_case, rel_err


@pytest.mark.parametrize("batch, pixels, dim, heads", [(2, 11, 32, 8), (3, 5, 40, 8), (1, 9, 24, 3)])
def test_published_loop_equals_oracle(batch, pixels, dim, heads):
    x0, x1, params = make_case((batch, pixels), dim, seed=dim)
    with torch.no_grad():
        y0, y1 = PublishedFusion.from_params(params, heads)(x0, x1)
        ref0, ref1 = gemini_fusion_reference(x0, x1, params, heads)
    assert rel_err(x0, ref0) > 1e-2  # the fusion changed the tokens: a comparison that can fail
    assert rel_err(y0, ref0) < 1e-12 and rel_err(y1, ref1) < 1e-12


def test_published_loop_gradients_equal_oracle():
    x0, x1, params = make_case((2, 6), 16, seed=3, requires_grad=True)
    module = PublishedFusion.from_params(params, 8)
    g0, g1 = torch.randn_like(x0), torch.randn_like(x1)
    torch.autograd.backward(module(x0, x1), (g0, g1))
    published = x0.grad.clone(), x1.grad.clone(), module.relation_judger[0].fc1.weight.grad
    x0.grad = x1.grad = None
    torch.autograd.backward(gemini_fusion_reference(x0, x1, params, 8), (g0, g1))
    assert rel_err(published[0], x0.grad) < 1e-12 and rel_err(published[1], x1.grad) < 1e-12
    assert rel_err(published[2], params.fc1_weight.grad) < 1e-12


def test_token_exchange_keeps_or_swaps_scaled_tokens():
    x0, x1, _ = make_case((2, 500), 64, seed=1)
    exchange = random_token_exchange(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0, y1 = exchange(x0, x1)
        m0, m1 = exchange.keep_scores(x0, x1)
    assert y0.shape == x0.shape and y1.shape == x1.shape and y0.dtype == x0.dtype
    kept0 = (m0 >= exchange.threshold).squeeze(-1)
    assert 0 < kept0.sum() < kept0.numel(), "the random score nets should exchange some tokens, not all"
    torch.testing.assert_close(y0[kept0], (x0 * m0)[kept0])
    torch.testing.assert_close(y0[~kept0], (x1 * m1)[~kept0])


def test_full_cross_attention_against_a_softmax_restatement():
    x0, x1, params = make_case((2, 13), 16, seed=2)
    y0, y1 = full_cross_attention(x0, x1, params, num_heads=4)
    assert y0.shape == x0.shape and y1.shape == x1.shape
    w_q, w_k, w_v = params.in_proj_weight_0.chunk(3)
    b_q, b_k, b_v = params.in_proj_bias_0.chunk(3)
    q, k, v = (t.unflatten(-1, (4, 4)) for t in (x0 @ w_q.T + b_q, x1 @ w_k.T + b_k, x1 @ w_v.T + b_v))
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(4), dim=-1)
    attended = torch.einsum("bhnm,bmhd->bnhd", weights, v).flatten(-2)
    expected0 = x0 + attended @ params.out_proj_weight_0.T + params.out_proj_bias_0
    assert rel_err(y0, expected0) < 1e-12
    # Every token sees every other token: changing one token of x1 changes all of y0.
    x1_changed = x1.clone()
    x1_changed[:, 0] += 1.0
    moved = (full_cross_attention(x0, x1_changed, params, num_heads=4)[0] - y0).abs().amax(-1)
    assert (moved > 0).all()
