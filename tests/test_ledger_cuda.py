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


_UNFUSED_BACKWARD = ("the backward recomputes the forward's chain and runs the transposed one as single "
                     "GEMMs and sums (52 launches with the gradients' assembly; a fused backward is to come)")


@pytest.mark.parametrize("stage", _xfail(_UNFUSED_BACKWARD, {1, 2, 3, 4}))
def test_cuda_training_launches_within_budget(stage):
    lg = counted(stage, "fwd+bwd")
    assert len(lg.launches) <= TRAINING_BUDGET[stage][0], ledger.detail(lg)


@pytest.mark.parametrize("stage", _xfail(_UNFUSED_BACKWARD, {1, 2, 3, 4}))
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


def test_the_backward_recomputes_to_the_keys_then_runs_the_transposed_chain():
    pixels, dim = STAGES[1]
    lg = counted(1, "fwd+bwd")
    names = [launch.name for launch in lg.launches]
    assert [n for n in names if n.endswith(("_forward", "_backward"))] == [
        "fused_forward",  # the forward
        "hidden_forward", "relation_forward", "mix_backward", "relation_backward", "hidden_backward"]
    # the forward's 8 and the backward's 23 C^2 multiply-adds per pixel and direction
    assert lg.flops == 2 * 2 * (8 + 23) * pixels * dim * dim
    assert lg.backward_peak_bytes > 0


def test_the_plans_name_their_buffers_and_aliases():
    plan = lambda backward, saved: list(torch.ops.gemini_kernels.chain_plan(backward, saved))  # noqa: E731
    forward = plan(False, False)
    assert "buffer|e|alias|hidden|2|C|0" in forward and "buffer|dk|alias|z|2|C|0" in forward
    assert "buffer|g0|output|g0|1|5C|0" in plan(False, True)  # saved for the backward
    resumed = plan(True, True)
    # d/dz is written over z, so a backward from the saved activations works on a copy of z
    assert "buffer|z|copied_input|z|2|C|0" in resumed and "buffer|grad_z|alias|z|2|C|0" in resumed
    steps = [row.split("|") for row in plan(True, False) if not row.startswith("buffer|")]
    assert [s[1] for s in steps if s[0] == "stage"] == [
        "hidden_forward", "relation_forward", "mix_backward", "relation_backward", "hidden_backward"]
    # the mix stages and the hidden stages touch disjoint column blocks of g (masks 28 and 3)
    mix_backward = next(s for s in steps if s[1] == "mix_backward")
    assert "g0:28" in mix_backward[8] and "grad_g0:28" in mix_backward[9]


def test_cli_counts_the_cuda_backend(capsys):
    assert ledger.main(["--backends", "cuda", "--passes", "fwd", "--batch", "2"]) == 0
    assert capsys.readouterr().out.count("cuda     fwd") == 4
    with pytest.raises(ValueError, match="count_cuda"):
        ledger.count("cuda", 64, 10)


def test_each_stage_does_what_it_declares():
    """The stage launches above (and the chain's plan check) take the stages' kReads / kWrites on
    trust: run on the host, a stage must depend on nothing else and write nothing else."""
    assert list(torch.ops.gemini_kernels.stage_access_mismatches()) == []
    # and the check sees a missing declaration: every stage's first read is one its outputs need
    missing = list(torch.ops.gemini_kernels.stage_access_mismatches(True))
    stages = ("hidden_forward", "relation_forward", "mix_forward", "mix_backward", "relation_backward",
              "hidden_backward")
    assert {line.split(",")[0] for line in missing} == set(stages), missing
