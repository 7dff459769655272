"""The formulations GeminiFusion is compared with in the benchmark (SPEC §3); none of them is the oracle.

Each takes the fusion's inputs, two aligned token maps ``x0, x1`` of shape ``(B, N, C)``, and returns
``(y0, y1)`` of the same shape:

- :class:`PublishedFusion`: the published code path for the GeminiFusion function itself, a Python loop
  over the batch around two ``nn.MultiheadAttention`` modules with a length-1 query (the pixel) and
  length-2 key/value sequences. Built once per parameter set with :meth:`PublishedFusion.from_params`.
- :class:`TokenExchange`: TokenFusion's token exchange, with its own score nets
  (:func:`random_token_exchange`). A different function: it only selects and scales tokens.
- :func:`full_cross_attention`: every token of one modality attends to all ``N`` tokens of the other,
  through ``F.scaled_dot_product_attention``. A different function, and quadratic in ``N``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .params import FusionParams


class _RelationJudger(nn.Module):
    """``Mlp_2`` of the published code (fc1, GELU, fc2); wrapped as ``relation_judger.0`` so the
    parameter names are the published ones."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PublishedFusion(nn.Module):
    """The fusion part of the published ``Attention.forward`` (models/mix_transformer.py), as published:
    one Python iteration per batch element, sequence-first ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.cross_attn_0_to_1 = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=False)
        self.cross_attn_1_to_0 = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=False)
        self.relation_judger = nn.Sequential(_RelationJudger(dim), nn.Softmax(dim=-1))
        self.k_noise = nn.Embedding(2, dim)
        self.v_noise = nn.Embedding(2, dim)

    @classmethod
    def from_params(cls, params: FusionParams, num_heads: int = 8) -> "PublishedFusion":
        """The modules holding copies of ``params``, on their device and in their dtype."""
        ref = params.fc2_weight
        module = cls(params.dim, num_heads).to(device=ref.device, dtype=ref.dtype)
        module.load_state_dict({k: v.detach() for k, v in params.state_dict().items()}, strict=True)
        return module

    def _direction(self, s: Tensor, o: Tensor, direction: int) -> Tensor:
        attn = self.cross_attn_0_to_1 if direction == 0 else self.cross_attn_1_to_0
        q = s.unsqueeze(0)  # (1, N, C): a length-1 sequence, the N pixels as the batch
        relation = self.relation_judger(torch.cat([q, o.unsqueeze(0)], dim=-1))
        k = torch.cat([self.k_noise.weight[direction] + q, q * relation], dim=0)
        v = torch.cat([self.v_noise.weight[direction] + q, o.unsqueeze(0)], dim=0)
        # The published call keeps MultiheadAttention's default need_weights=True (it also averages the
        # attention weights); timing it as published means keeping that.
        return s + attn(q, k, v)[0].squeeze(0)

    def forward(self, x0: Tensor, x1: Tensor):
        y0, y1 = [], []
        for b in range(x0.shape[0]):
            y0.append(self._direction(x0[b], x1[b], 0))
            y1.append(self._direction(x1[b], x0[b], 1))
        return torch.stack(y0), torch.stack(y1)


class _ScoreNet(nn.Module):
    """TokenFusion's per-token score: LN, C -> C -> C/2 -> C/4 -> 2 with GELUs, log-softmax."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim), nn.GELU(),
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TokenExchange(nn.Module):
    """Token exchange (TokenFusion, SPEC §3) applied to two token maps.

    ``x0, x1`` play both roles of the published layer: the block input the score nets read and the
    attention output that is scaled and exchanged. A token of modality 0 whose keep-score
    ``m0 = softmax(score0)[..., 0]`` is below ``threshold`` is replaced by modality 1's token, and
    symmetrically. The L1 penalty on the scores belongs to the training loss; :meth:`keep_scores`
    returns them for it.
    """

    def __init__(self, dim: int, threshold: float = 0.02):
        super().__init__()
        if dim % 4:
            raise ValueError(f"dim must be divisible by 4 (the score net narrows to dim/4); got {dim}")
        self.score_0 = _ScoreNet(dim)
        self.score_1 = _ScoreNet(dim)
        self.threshold = threshold

    def keep_scores(self, x0: Tensor, x1: Tensor):
        return self.score_0(x0).exp()[..., :1], self.score_1(x1).exp()[..., :1]

    def forward(self, x0: Tensor, x1: Tensor):
        m0, m1 = self.keep_scores(x0, x1)
        x0, x1 = x0 * m0, x1 * m1
        return torch.where(m0 >= self.threshold, x0, x1), torch.where(m1 >= self.threshold, x1, x0)


def random_token_exchange(dim: int, *, dtype=torch.float32, device=None, generator=None) -> TokenExchange:
    """A :class:`TokenExchange` with random weights, in ``dtype`` on ``device``.

    The last layer of each score net is calibrated on unit-normal tokens so that the keep-logit margin
    ``score[0] - score[1]`` has mean 1 and standard deviation 2.5: about 2-3 % of the tokens fall below
    the 0.02 threshold and are exchanged, as in a trained model where exchange is the exception.
    """
    module = TokenExchange(dim)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            elif "net.0" not in name:  # Linear biases; the LayerNorm keeps its identity init
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        probe = torch.randn(4096, dim, generator=generator)
        for score in (module.score_0, module.score_1):
            last = score.net[7]
            margin = score(probe)
            margin = margin[:, 0] - margin[:, 1]
            last.weight.mul_(2.5 / margin.std())
            margin = score(probe)
            margin = margin[:, 0] - margin[:, 1]
            last.bias[0] += 1.0 - margin.mean()
    return module.to(device=device, dtype=dtype)


def full_cross_attention(x0: Tensor, x1: Tensor, params: FusionParams, num_heads: int = 8):
    """``y0 = x0 + MHA(query x0, keys and values x1)`` over all ``N`` tokens, and symmetrically,
    with the projections of the fusion's two ``nn.MultiheadAttention`` modules (SPEC §3)."""

    def direction(s: Tensor, o: Tensor, in_w: Tensor, in_b: Tensor, out_w: Tensor, out_b: Tensor) -> Tensor:
        w_q, w_k, w_v = in_w.chunk(3)
        b_q, b_k, b_v = in_b.chunk(3)

        def heads(t: Tensor) -> Tensor:  # (B, N, C) -> (B, h, N, dh)
            return t.unflatten(-1, (num_heads, -1)).transpose(-3, -2)

        q, k, v = heads(F.linear(s, w_q, b_q)), heads(F.linear(o, w_k, b_k)), heads(F.linear(o, w_v, b_v))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).flatten(-2)
        return s + F.linear(attended, out_w, out_b)

    p = params
    y0 = direction(x0, x1, p.in_proj_weight_0, p.in_proj_bias_0, p.out_proj_weight_0, p.out_proj_bias_0)
    y1 = direction(x1, x0, p.in_proj_weight_1, p.in_proj_bias_1, p.out_proj_weight_1, p.out_proj_bias_1)
    return y0, y1
