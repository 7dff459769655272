"""The numerics probe of backend="cuda" on the host: run by tests/test_cuda_host.py in a subprocess per
CPU capability (the extension picks its row-stage code once per process, from ATEN_CPU_CAPABILITY);
prints one JSON line of measurements, which the test judges."""
import json
import math

import torch

from gemini_kernels import FusionParams, gemini_fusion
from gemini_kernels.ops import cuda_fusion
from gemini_kernels.reference import gemini_fusion_reference, relation_scores
from helpers import make_case, rel_err

assert cuda_fusion._load(), cuda_fusion._load_error
out = {"capability": torch.backends.cpu.get_cpu_capability()}

# float32 near overflow: heads in which the float64 products q_c * dk_c include some beyond +4e38 and
# some beyond -4e38 must have a NaN gate (inf - inf), as the oracle's rounded products give.
forced = unforced = 0
for dim, heads, seed in ((64, 1, 31), (64, 2, 32), (128, 4, 33)):
    x0, x1, params = make_case((3, 40), dim, dtype=torch.float32, seed=seed)
    x0, x1 = x0 * 3e19, x1 * 3e19
    _, _, gate, _ = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), heads)
    p64 = FusionParams(*(t.double() for t in params))
    xs = (x0.double(), x1.double())
    for d in range(2):
        s, o = xs[d], xs[1 - d]
        w_q, w_k, _ = (p64.in_proj_weight_0 if d == 0 else p64.in_proj_weight_1).chunk(3)
        b_q = (p64.in_proj_bias_0 if d == 0 else p64.in_proj_bias_1).chunk(3)[0]
        r = relation_scores(s, o, p64)
        q = (s @ w_q.T + b_q) / math.sqrt(dim // heads)
        dk = (p64.k_noise[d] + s - s * r) @ w_k.T
        prod = (q * dk).unflatten(-1, (heads, dim // heads))
        must_nan = (prod.amax(-1) > 4e38) & (prod.amin(-1) < -4e38)
        forced += int(must_nan.sum())
        unforced += int((must_nan & ~gate[d].isnan()).sum())
out["overflow_heads"] = forced
out["overflow_heads_not_nan"] = unforced

# A saturated relation softmax (float64; the bias of one channel 300 above the others): the
# relation-judger gradients are ~1e-129 in the oracle, not rounding residue of ~1e-16.
errors = {}
for dim, heads in ((64, 8), (320, 8)):
    x0, x1, params = make_case((2, 9), dim, dtype=torch.float64, seed=dim, requires_grad=True)
    with torch.no_grad():
        params.fc2_bias[5] += 300
    inputs = [params.fc1_weight, params.fc1_bias, params.fc2_weight, params.fc2_bias]

    def grads(fn):
        y0, y1 = fn(x0, x1, params, heads)
        return torch.autograd.grad((y0 * y1).sum(), inputs)

    ours = grads(lambda *a: gemini_fusion(*a, backend="cuda"))
    ref = grads(gemini_fusion_reference)
    for name, a, b in zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), ours, ref):
        errors[f"C={dim} {name}"] = [rel_err(a, b), a.abs().max().item(), b.abs().max().item()]
out["saturated"] = errors
print(json.dumps(out))
