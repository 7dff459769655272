"""The launch ledger of the cuda backend's GPU plan (ledger.count_cuda), issue 15's budgets on it, and the
stage declarations it counts by.

The extension counts its GPU plan as its CUDA build runs it, on meta tensors, so no GPU is needed: the
fused kernels' launches with what each declares it reads and writes, and the chain (csrc/fusion_chain.h)
where no fused kernel takes a layer: the aten ops it calls and one launch per row stage, reading and
writing what the stage declares. The budgets are issue 15's, at bf16, batch 32, NYUDv2 stage shapes.
"""
import functools

import pytest
import torch

from gemini_kernels import ledger
from gemini_kernels.ops import cuda_fusion
from gemini_kernels.params import param_shapes
from gemini_kernels.shapes import stage_dims

if not cuda_fusion._load():
    pytest.skip(f"the compiled extension is not available: {cuda_fusion._load_error}", allow_module_level=True)

BATCH = 32
STAGES = {stage: (BATCH * tokens, dim) for stage, (tokens, dim) in stage_dims("nyudv2", "mit-b1").items()}
# stage: (launches, bytes / floor), forward and forward + backward (issue 15)
FORWARD_BUDGET = {1: (6, 2.0), 2: (6, 2.0), 3: (12, 8.0), 4: (12, 8.0)}
TRAINING_BUDGET = {1: (30, 6.0), 2: (30, 6.0), 3: (40, 12.0), 4: (40, 12.0)}
HEADS = 8


@functools.lru_cache(maxsize=None)
def counted(stage, passes):
    pixels, dim = STAGES[stage]
    return ledger.count_cuda(dim, pixels, torch.bfloat16, passes)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cuda_forward_launches_within_budget(stage):
    assert len(counted(stage, "fwd").launches) <= FORWARD_BUDGET[stage][0], ledger.detail(counted(stage, "fwd"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cuda_forward_bytes_within_budget(stage):
    assert counted(stage, "fwd").bytes_over_floor <= FORWARD_BUDGET[stage][1], ledger.detail(counted(stage, "fwd"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cuda_training_launches_within_budget(stage):
    lg = counted(stage, "fwd+bwd")
    assert len(lg.launches) <= TRAINING_BUDGET[stage][0], ledger.detail(lg)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cuda_training_bytes_within_budget(stage):
    lg = counted(stage, "fwd+bwd")
    assert lg.bytes_over_floor <= TRAINING_BUDGET[stage][1], ledger.detail(lg)


def test_narrow_forwards_are_one_fused_launch():
    pixels, dim = STAGES[1]
    lg = counted(1, "fwd")
    [launch] = lg.launches
    assert launch.name == "fused_forward"
    row = pixels * dim * 2  # one (pixels, C) bf16 matrix
    weights = sum(2 * torch.Size(s).numel() for s in param_shapes(dim).values())
    gates = 2 * pixels * HEADS * 4
    # x0, x1 and the parameters in; y0, y1 and the float gates out, nothing else of the pixels
    assert (launch.bytes_read, launch.bytes_written) == (2 * row + weights, 2 * row + gates)
    # 8 C^2 multiply-adds per pixel and direction (SPEC §4), and autograd keeps the float gates
    assert lg.flops == 2 * 2 * 8 * pixels * dim * dim
    assert lg.saved_bytes == gates


@pytest.mark.parametrize("stage", [3, 4])
def test_wide_forwards_are_five_block_launches(stage):
    """Of the pixels, the wide forward moves x0, x1, y0, y1 and three intermediates a direction (fc1's
    pre-activation u, z, the mix, each written once and read once), the softmax's
    per-block statistics and the gates; the parameters once over the five launches, but for the key
    bias, which cancels."""
    pixels, dim = STAGES[stage]
    lg = counted(stage, "fwd")
    assert [launch.name for launch in lg.launches] == [
        "wide_forward_pre", "wide_forward_logits", "wide_forward_gates", "wide_forward_values",
        "wide_forward_output"]
    row = pixels * dim * 2  # one (pixels, C) bf16 matrix
    weights = sum(2 * torch.Size(s).numel() for s in param_shapes(dim).values()) - 2 * 2 * dim
    gates = 2 * pixels * HEADS * 4
    blocks = {320: 4, 512: 4}[dim]  # blocks of whole heads, a multiple of 16 channels, at most 128
    stats = 2 * pixels * blocks * 2 * 4
    read = sum(launch.bytes_read for launch in lg.launches)
    written = sum(launch.bytes_written for launch in lg.launches)
    assert (read, written) == (14 * row + stats + gates + weights, 8 * row + stats + gates)
    assert lg.flops == 2 * 2 * 8 * pixels * dim * dim
    assert lg.saved_bytes == gates


def test_stage_launches_move_what_the_stages_declare():
    pixels, dim = 1000, 168  # wider than the fused forward takes, heads of 21 channels: the chain
    lg = ledger.count_cuda(dim, pixels, torch.bfloat16, "fwd")
    stages = {launch.name: launch for launch in lg.launches if not launch.name.startswith(("mm", "bmm", "addmm"))}
    row = pixels * dim * 2  # one (pixels, C) bf16 matrix
    # both fc1 column blocks of g0 and g1 in, hidden (2, M, C) out
    assert (stages["hidden_forward"].bytes_read, stages["hidden_forward"].bytes_written) == (4 * row, 2 * row)
    # z, x0, x1 in; e out (the forward keeps no log-sum-exp)
    assert (stages["relation_forward"].bytes_read, stages["relation_forward"].bytes_written) == (4 * row, 2 * row)
    # the query and value blocks of g0 and g1, dk, x0, x1 in; the float gates, mixed, y0, y1 out
    mix = stages["mix_forward"]
    assert (mix.bytes_read, mix.bytes_written) == (6 * row + 2 * row + 2 * row, 2 * pixels * HEADS * 4 + 4 * row)


def test_narrow_backwards_are_one_fused_launch_and_a_reduction():
    """The fused backward reads x0, x1, dy0, dy1, the gates and the parameters once and writes dx0, dx1
    and each program's partial sums of the weight gradients (an H100's 132 programs at C = 64: one an
    SM, their sums within its L2); the reduction reads the partial sums and writes the parameters'
    gradients."""
    pixels, dim = STAGES[1]
    lg = counted(1, "fwd+bwd")
    assert [launch.name for launch in lg.launches] == ["fused_forward", "fused_backward", "fused_backward_reduce"]
    _, tiles, reduce = lg.launches
    row = pixels * dim * 2
    weights = sum(2 * torch.Size(s).numel() for s in param_shapes(dim).values())
    gates = 2 * pixels * HEADS * 4
    partials = 132 * sum(torch.Size(s).numel() for s in param_shapes(dim).values()) * 4  # float sums
    assert (tiles.bytes_read, tiles.bytes_written) == (4 * row + gates + weights, 2 * row + partials)
    assert (reduce.bytes_read, reduce.bytes_written) == (partials, weights)
    # the forward's 8 and the backward's 23 C^2 multiply-adds per pixel and direction (7 of them recompute
    # the forward's products)
    assert lg.flops == 2 * 2 * (8 + 23) * pixels * dim * dim
    assert lg.backward_peak_bytes > 0


@pytest.mark.parametrize("stage", [3, 4])
def test_wide_backwards_are_eight_block_launches(stage):
    """The wide backward recomputes from x0, x1 and the gates, runs the input gradients in six launches,
    every weight gradient in one (64 x 64 tiles summed over all pixels in order, the bias gradients beside
    them) and the noise gradients from its column sums in one: the forward's 8 and the backward's 23 C^2
    multiply-adds per pixel and direction, as the chain's, and four vector-matrix products of C^2 for the
    noises."""
    pixels, dim = STAGES[stage]
    lg = counted(stage, "fwd+bwd")
    names = [launch.name for launch in lg.launches]
    assert names[:5] == [launch.name for launch in counted(stage, "fwd").launches]  # the wide forward
    # the forward's first two passes again (u, z), then the backward's own six
    assert names[5:] == ["wide_forward_pre", "wide_forward_logits"] + [
        "wide_backward_" + n for n in ("heads", "keys", "judger", "inputs", "weights", "noise")]
    assert lg.flops == 2 * 2 * (8 + 23) * pixels * dim * dim + 2 * 4 * dim * dim
    assert lg.backward_peak_bytes > 0
    shapes = param_shapes(dim)
    weights = sum(2 * torch.Size(s).numel() for s in shapes.values())
    noise = sum(2 * torch.Size(shapes[name]).numel() for name in ("k_noise.weight", "v_noise.weight"))
    weights_launch, noise_launch = lg.launches[-2:]
    # every parameter's gradient written once, the noises' from four float column sums of C
    assert weights_launch.bytes_written == weights - noise + 4 * dim * 4
    assert noise_launch.bytes_written == noise


def test_chain_backwards_recompute_to_the_keys_then_run_the_transposed_chain():
    """Where no fused kernel takes a layer (heads of 21 channels), the backward recomputes the chain up to
    the keys from x0, x1 and the gates, runs the transposed chain, and assembles the 14 parameters'
    gradients in one launch, the last, writing each once."""
    pixels, dim = 1000, 168
    lg = ledger.count_cuda(dim, pixels, torch.bfloat16, "fwd+bwd")
    names = [launch.name for launch in lg.launches]
    assert [n for n in names if n.endswith(("_forward", "_backward"))] == [
        "hidden_forward", "relation_forward", "mix_forward",  # the forward
        "hidden_forward", "relation_forward", "mix_backward", "relation_backward", "hidden_backward"]
    assert lg.flops == 2 * 2 * (8 + 23) * pixels * dim * dim
    assert names[-1] == "assemble_gradients" and names.count("assemble_gradients") == 1
    weights = sum(2 * torch.Size(s).numel() for s in param_shapes(dim).values())
    assert lg.launches[-1].bytes_written == weights


def test_the_programs_partial_sums_stay_within_the_l2():
    """Every tile reads and writes its program's partial sums: at C = 128 an H100 runs 57 programs, not
    132, so that all of them fit 4/5 of its 50 MiB of L2."""
    pixels, dim = STAGES[2]
    reduce = counted(2, "fwd+bwd").launches[-1]
    per_program = sum(torch.Size(s).numel() for s in param_shapes(dim).values()) * 4
    assert reduce.name == "fused_backward_reduce" and reduce.bytes_read == 57 * per_program
    assert 57 * per_program <= 0.8 * 50 * 2 ** 20 < 58 * per_program
