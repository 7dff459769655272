"""The launch ledger of the cuda backend's GPU plan (ledger.count_cuda), issue 15's budgets on it, and the
stage declarations it counts by.

The extension counts its own chain (csrc/fusion_chain.h) as its CUDA build runs it, on meta tensors,
so no GPU is needed: the aten ops it calls and one launch per row stage, reading and writing what
the stage declares. The budgets are issue 15's, at bf16, batch 32, NYUDv2 stage shapes; those the
backend does not meet yet are strict xfails, which fail the day they start to hold.
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


def _xfail(reason, stages):
    return [pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=reason)) if s in stages else s
            for s in sorted(STAGES)]


_UNFUSED = ("beyond C = 128 the forward is cuBLAS GEMMs with row stages between them: 9 launches, each "
            "intermediate a round trip through DRAM")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cuda_forward_launches_within_budget(stage):
    assert len(counted(stage, "fwd").launches) <= FORWARD_BUDGET[stage][0], ledger.detail(counted(stage, "fwd"))


@pytest.mark.parametrize("stage", _xfail(_UNFUSED, {3, 4}))
def test_cuda_forward_bytes_within_budget(stage):
    assert counted(stage, "fwd").bytes_over_floor <= FORWARD_BUDGET[stage][1], ledger.detail(counted(stage, "fwd"))


_UNFUSED_BACKWARD = ("beyond C = 128 the backward recomputes the forward's chain and runs the transposed one as "
                     "single GEMMs and sums (30 launches), every intermediate a round trip through DRAM")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_cuda_training_launches_within_budget(stage):
    lg = counted(stage, "fwd+bwd")
    assert len(lg.launches) <= TRAINING_BUDGET[stage][0], ledger.detail(lg)


@pytest.mark.parametrize("stage", _xfail(_UNFUSED_BACKWARD, {3, 4}))
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


def test_wide_forwards_are_the_chain_as_one_range():
    pixels, dim = STAGES[3]
    lg = counted(3, "fwd")
    assert [launch.name for launch in lg.launches] == [
        "mm", "mm", "hidden_forward", "mm", "relation_forward", "bmm", "mix_forward", "addmm_", "addmm_"]
    assert lg.flops == 2 * 2 * 8 * pixels * dim * dim
    assert lg.saved_bytes == 2 * pixels * HEADS * 4


def test_stage_launches_move_what_the_stages_declare():
    pixels, dim = 1000, 160  # wider than the fused forward takes
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


def test_wide_backwards_recompute_to_the_keys_then_run_the_transposed_chain():
    pixels, dim = STAGES[3]
    lg = counted(3, "fwd+bwd")
    names = [launch.name for launch in lg.launches]
    assert [n for n in names if n.endswith(("_forward", "_backward"))] == [
        "hidden_forward", "relation_forward", "mix_forward",  # the forward
        "hidden_forward", "relation_forward", "mix_backward", "relation_backward", "hidden_backward"]
    assert lg.flops == 2 * 2 * (8 + 23) * pixels * dim * dim
    assert lg.backward_peak_bytes > 0
    # the 14 parameters' gradients in one launch from the reduced sums: the last, writing each once
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
