"""The reference segmentation model (models/gemini_seg): shapes, parameter counts, the published
checkpoint layout, ImageNet MiT weights, backend-independence of training, DDP, data loaders, resume."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemini_kernels
from gemini_kernels import GeminiFusion, load_checkpoint_file
from gemini_seg import build_model, load_imagenet_mit, load_published_checkpoint, to_published_state_dict
from gemini_seg.data import FolderRGBD, SyntheticRGBD
from gemini_seg.mit import MIT_CONFIGS
from gemini_seg import train as train_cli
from gemini_seg.train import lr_factor, parse_args, run
from helpers import rel_err

# --------------------------------------------------------------------------------------------------
# Independent statement of the published names and shapes, written from JiaDingCN/GeminiFusion
# models/mix_transformer.py + segformer.py + modules.py (ModuleParallel adds ".module.", LayerNormParallel
# holds ln_0 / ln_1, DDP adds the "module." prefix), and of SegFormer's single-stream mit_b*.pth names.


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many small ops: on a 2-core machine shared with other jobs, two intra-op threads
    per process oversubscribe it and run several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def imagenet_mit_shapes(cfg):
    """name -> shape of SegFormer's ImageNet mit_b*.pth (classifier head included)."""
    shapes, previous = {}, 3
    for s, (c, depth, sr) in enumerate(zip(cfg.embed_dims, cfg.depths, cfg.sr_ratios), start=1):
        k = 7 if s == 1 else 3
        shapes[f"patch_embed{s}.proj.weight"] = (c, previous, k, k)
        shapes[f"patch_embed{s}.proj.bias"] = (c,)
        shapes[f"patch_embed{s}.norm.weight"] = shapes[f"patch_embed{s}.norm.bias"] = (c,)
        for i in range(depth):
            b = f"block{s}.{i}."
            for norm in ("norm1", "norm2"):
                shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (c,)
            shapes[b + "attn.q.weight"], shapes[b + "attn.q.bias"] = (c, c), (c,)
            shapes[b + "attn.kv.weight"], shapes[b + "attn.kv.bias"] = (2 * c, c), (2 * c,)
            if sr > 1:
                shapes[b + "attn.sr.weight"], shapes[b + "attn.sr.bias"] = (c, c, sr, sr), (c,)
                shapes[b + "attn.norm.weight"] = shapes[b + "attn.norm.bias"] = (c,)
            shapes[b + "attn.proj.weight"], shapes[b + "attn.proj.bias"] = (c, c), (c,)
            shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (4 * c, c), (4 * c,)
            shapes[b + "mlp.dwconv.dwconv.weight"], shapes[b + "mlp.dwconv.dwconv.bias"] = (4 * c, 1, 3, 3), (4 * c,)
            shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (c, 4 * c), (c,)
        shapes[f"norm{s}.weight"] = shapes[f"norm{s}.bias"] = (c,)
        previous = c
    shapes["head.weight"], shapes["head.bias"] = (1000, cfg.embed_dims[-1]), (1000,)
    return shapes


SHARED = ("proj.weight", "proj.bias", "q.weight", "q.bias", "kv.weight", "kv.bias", "sr.weight", "sr.bias",
          "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def published_keys(cfg):
    """Every key of a published GeminiFusion checkpoint's "segmenter" entry for this MiT config."""
    keys = set()
    for name in imagenet_mit_shapes(cfg):
        if name.startswith("head."):
            continue
        stem, leaf = name.rsplit(".", 1)
        if stem.endswith("norm") or stem.endswith("norm1") or stem.endswith("norm2") or stem.split(".")[-1].startswith("norm"):
            keys |= {f"module.encoder.{stem}.ln_{m}.{leaf}" for m in (0, 1)}
        elif name.endswith(SHARED) and "dwconv" not in name:
            keys.add(f"module.encoder.{stem}.module.{leaf}")
        else:
            keys.add(f"module.encoder.{name}")
    for s, depth in enumerate(cfg.depths, start=1):
        for i in range(depth):
            a = f"module.encoder.block{s}.{i}.attn."
            for d in ("cross_attn_0_to_1", "cross_attn_1_to_0"):
                keys |= {a + d + t for t in (".in_proj_weight", ".in_proj_bias", ".out_proj.weight", ".out_proj.bias")}
            keys |= {a + f"relation_judger.0.{fc}.{t}" for fc in ("fc1", "fc2") for t in ("weight", "bias")}
            keys |= {a + "k_noise.weight", a + "v_noise.weight"}
    for s in range(1, 5):
        keys |= {f"module.decoder.linear_c{s}.proj.weight", f"module.decoder.linear_c{s}.proj.bias"}
    keys |= {"module.decoder.linear_fuse.conv.weight", "module.decoder.linear_pred.weight",
             "module.decoder.linear_pred.bias", "module.alpha"}
    keys |= {f"module.decoder.linear_fuse.bn.{t}"
             for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    return keys


def randomise_(model, seed):
    """Every parameter and BN statistic random (non-zero), so that a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 + 0.9 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.05)


def images(batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]


# ---------------------------------------------------------------------------------------------- model


def test_b0_forward_shapes_and_ensemble():
    torch.manual_seed(0)
    model = build_model("mit_b0", num_classes=5, fusion_backend="torch").eval()
    with torch.no_grad():
        model.alpha.copy_(torch.tensor([0.3, -0.4]))
        out = model(images())
    assert [tuple(o.shape) for o in out] == [(2, 5, 16, 16)] * 3
    assert all(torch.isfinite(o).all() for o in out)
    w = torch.softmax(torch.tensor([0.3, -0.4]), 0)
    assert rel_err(out[2], w[0] * out[0] + w[1] * out[1]) < 1e-6
    assert rel_err(out[0], out[1]) > 1e-2  # the streams differ (different inputs, per-modality norms)
    # 8 blocks, one fusion layer each, every one on the chosen backend.
    fusions = [m for m in model.modules() if isinstance(m, GeminiFusion)]
    assert len(fusions) == 8 and {f.backend for f in fusions} == {"torch"}

    single = build_model("mit_b0", num_classes=5, num_modalities=1).eval()
    with torch.no_grad():
        (logits,) = single([images()[0]])
    assert logits.shape == (2, 5, 16, 16)
    assert not any(isinstance(m, GeminiFusion) for m in single.modules())
    with pytest.raises(ValueError, match="inputs must be a list of 2"):
        model([images()[0]])
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_model("mit_b9")


def test_fusion_changes_the_streams_and_backend_switch_keeps_parameters():
    torch.manual_seed(0)
    fused = build_model("mit_b0", num_classes=5, fusion_backend="torch").eval()
    plain = build_model("mit_b0", num_classes=5, fusion=False).eval()
    state = {k: v for k, v in fused.state_dict().items() if ".fusion." not in k}
    plain.load_state_dict(state, strict=True)  # the fusion layers are the only difference
    x = images()
    with torch.no_grad():
        a, b = fused(x)[0], plain(x)[0]
        assert rel_err(a, b) > 1e-3
        before = {k: v.clone() for k, v in fused.state_dict().items()}
        for backend in gemini_kernels.available_backends("cpu"):
            fused.set_fusion_backend(backend)
            assert rel_err(fused(x)[0], a) < 1e-4, backend
    after = fused.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# Single-stream MiT encoder sizes from the SegFormer paper (Table 1 / 7, millions, ImageNet head excluded).
SEGFORMER_ENCODER_M = {"mit_b0": 3.4, "mit_b1": 13.1, "mit_b2": 24.2, "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4}


def fusion_param_count(c):
    return (2 * c * c + c) + (c * c + c) + 2 * 2 * c + 2 * (3 * c * c + 3 * c + c * c + c)


@pytest.mark.parametrize("backbone", sorted(MIT_CONFIGS))
def test_param_counts(backbone):
    cfg = MIT_CONFIGS[backbone]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        single = build_model(backbone, num_classes=40, num_modalities=1)
        dual_plain = build_model(backbone, num_classes=40, fusion=False)
        fused = build_model(backbone, num_classes=40)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert abs(count(single.encoder) / 1e6 - SEGFORMER_ENCODER_M[backbone]) < 0.1
    norms_per_stream = sum(2 * c * (2 * d + 2 + d * (sr > 1))
                           for c, d, sr in zip(cfg.embed_dims, cfg.depths, cfg.sr_ratios))
    assert count(dual_plain) - count(single) == norms_per_stream + 2  # + alpha
    assert count(fused) - count(dual_plain) == sum(d * fusion_param_count(c)
                                                   for c, d in zip(cfg.embed_dims, cfg.depths))
    expected = {n: s for n, s in imagenet_mit_shapes(cfg).items() if not n.startswith("head.")}
    ours = {k.replace(".ln_0", ""): tuple(v.shape) for k, v in single.encoder.state_dict().items()}
    assert ours == expected


def test_drop_path_is_per_modality_and_sample():
    from gemini_seg.layers import DropPath

    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    x = torch.ones(2, 64, 5, 3)  # (S, B, N, C)
    y = layer(x)
    kept = y[:, :, 0, 0] != 0
    assert torch.equal(y, kept[:, :, None, None].float().expand_as(x) * 2.0)  # whole samples, rescaled
    assert 0 < kept.sum() < kept.numel() and not torch.equal(kept[0], kept[1])  # streams draw apart
    assert torch.equal(layer.eval()(x), x)


def test_speed_script_runs_and_published_loop_matches(tmp_path):
    """bench/model_speed.py (a GPU benchmark) on a tiny CPU case, so that it cannot rot unnoticed."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "model_speed.py")
    spec = importlib.util.spec_from_file_location("model_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--backbone", "mit_b0", "--batch", "2", "--height", "64", "--width", "64", "--dtype",
                       "float32", "--warmup", "0", "--runs", "1", "--no-write", "--json", str(tmp_path / "s.json")])
    by_name = {r["variant"]: r for r in rows}
    assert by_name["published per-batch loop"]["rel_err_vs_oracle"] < 1e-5
    assert by_name["fused, backend=torch"]["rel_err_vs_oracle"] == 0.0
    assert "fusion removed" in by_name and (tmp_path / "s.json").exists()


# ------------------------------------------------------------------------------------------ checkpoints


def test_published_checkpoint_layout_roundtrip(tmp_path):
    torch.manual_seed(1)
    source = build_model("mit_b0", num_classes=40, fusion_backend="torch")
    randomise_(source, seed=1)
    state = to_published_state_dict(source)
    assert set(state) == published_keys(MIT_CONFIGS["mit_b0"])
    path = tmp_path / "nyudv2_mit_b0.pth.tar"
    torch.save({"segmenter": state, "epoch_start": 7, "best_val": 51.2}, path)

    torch.manual_seed(2)
    target = build_model("mit_b0", num_classes=40, fusion_backend="torch")
    extras = load_published_checkpoint(target, str(path))
    assert extras == {"epoch_start": 7, "best_val": 51.2}
    x = images(seed=3)
    source.eval(), target.eval()
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            assert torch.equal(a, b)

    # The documented unmapped list is empty: any extra or missing key is an error naming it.
    broken = dict(state)
    broken["module.encoder.block1.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="1 checkpoint keys unmapped"):
        load_published_checkpoint(target, {"segmenter": broken})
    broken = dict(state)
    del broken["module.encoder.block1.0.attn.k_noise.weight"]
    with pytest.raises(KeyError, match="1 model entries unfilled"):
        load_published_checkpoint(target, {"segmenter": broken})
    # Fine-tuning to another class count skips the classifier only.
    other = build_model("mit_b0", num_classes=37)
    load_published_checkpoint(other, str(path), exclude=("decoder.linear_pred.",))
    assert torch.equal(other.encoder.block2[1].attn.fusion.k_noise.weight,
                       state["module.encoder.block2.1.attn.k_noise.weight"])


def test_imagenet_mit_weights_load_into_both_streams(tmp_path):
    cfg = MIT_CONFIGS["mit_b0"]
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) for n, s in imagenet_mit_shapes(cfg).items()}
    path = tmp_path / "mit_b0.pth"
    torch.save(weights, path)
    model = build_model("mit_b0", num_classes=40)
    fusion_before = model.encoder.block3[0].attn.fusion.k_noise.weight.clone()
    load_imagenet_mit(model, str(path))
    enc = model.encoder
    assert torch.equal(enc.block1[0].attn.q.weight, weights["block1.0.attn.q.weight"])
    assert torch.equal(enc.block2[1].mlp.dwconv.dwconv.weight, weights["block2.1.mlp.dwconv.dwconv.weight"])
    for m in (0, 1):
        assert torch.equal(getattr(enc.block1[1].norm2, f"ln_{m}").weight, weights["block1.1.norm2.weight"])
        assert torch.equal(getattr(enc.block1[0].attn.norm, f"ln_{m}").bias, weights["block1.0.attn.norm.bias"])
        assert torch.equal(getattr(enc.patch_embed3.norm, f"ln_{m}").weight, weights["patch_embed3.norm.weight"])
        assert torch.equal(getattr(enc.norm4, f"ln_{m}").bias, weights["norm4.bias"])
    assert torch.equal(enc.block3[0].attn.fusion.k_noise.weight, fusion_before)
    # Identical streams before fusion: with the same image on both, stage-1 patch embeddings agree.
    del weights["block1.0.attn.q.weight"]
    with pytest.raises(KeyError, match="1 encoder entries unfilled"):
        load_imagenet_mit(model, weights)


# ------------------------------------------------------------------------------------------- training


def small_run(tmp_path, *extra):
    return parse_args([
        "--backbone", "mit_b0", "--synthetic-size", "32", "32", "--synthetic-train", "6", "--synthetic-val", "2",
        "--val-batch-size", "2", "--batch-size", "2", "--workers", "0", "--warmup-iters", "2", "--lr", "2e-4",
        "--quiet", "--out-dir", str(tmp_path), *extra,
    ])


OTHER_CPU_BACKENDS = [b for b in gemini_kernels.available_backends("cpu") if b != "torch"]


@pytest.mark.parametrize(
    "backend",
    OTHER_CPU_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
        reason="no fused backend other than the oracle is available on CPU here"))],
)
def test_loss_curve_matches_oracle(tmp_path, backend):
    """Same seed, same data, 4 AdamW steps of MiT-B0: the per-step training losses with a fused backend
    agree with the oracle's to 1e-3 relative. Calibration (CPU, fp32): the oracle evaluated in float64
    differs by <= 1.3e-7; a backend with the right forward but no gradient into the fusion parameters
    differs by 4.7e-3 at step 3, so the tolerance separates rounding from a wrong backward."""
    steps = ["--max-steps", "4", "--dpr", "0.1"]
    oracle = run(small_run(tmp_path / "oracle", "--fusion-backend", "torch", *steps))["losses"]
    fused = run(small_run(tmp_path / backend, "--fusion-backend", backend, *steps))["losses"]
    assert len(oracle) == len(fused) == 4
    np.testing.assert_allclose(fused, oracle, rtol=1e-3)


def test_resume_continues_exactly(tmp_path):
    # --max-iters: the schedule of the 5-step run (a resume keeps the first run's schedule otherwise)
    common = ["--fusion-backend", "torch", "--dpr", "0.2", "--eval-every", "100", "--max-iters", "5"]
    straight = run(small_run(tmp_path / "a", *common, "--max-steps", "5"))
    run(small_run(tmp_path / "b", *common, "--max-steps", "2"))  # stops mid-epoch (3 steps per epoch)
    resumed = run(small_run(tmp_path / "b", *common, "--max-steps", "5", "--resume", str(tmp_path / "b" / "last.pth.tar")))
    assert resumed["losses"] == straight["losses"][2:]
    a = load_checkpoint_file(tmp_path / "a" / "last.pth.tar")
    b = load_checkpoint_file(tmp_path / "b" / "last.pth.tar")
    assert a["step"] == b["step"] == 5
    assert all(torch.equal(a["segmenter"][k], b["segmenter"][k]) for k in a["segmenter"])
    assert straight["losses"][-1] < straight["losses"][0]


def test_init_checkpoint_and_resume_read_numpy_best_val(tmp_path):
    """The published Saver stores best_val as a numpy.float64, which torch.load(weights_only=True)
    refused: --resume and --init-checkpoint read such files (through load_checkpoint_file)."""
    common = ["--fusion-backend", "torch", "--dpr", "0", "--eval-every", "100"]
    run(small_run(tmp_path / "a", *common, "--max-steps", "1"))
    last = tmp_path / "a" / "last.pth.tar"
    state = load_checkpoint_file(last)
    state["best_val"] = np.float64(state["best_val"])
    torch.save(state, last)
    with pytest.raises(Exception):
        torch.load(last, weights_only=True)
    resumed = run(small_run(tmp_path / "a", *common, "--max-steps", "2", "--resume", str(last)))
    assert resumed["step"] == 2 and len(resumed["losses"]) == 1
    published = tmp_path / "nyudv2_mit_b0.pth.tar"
    torch.save({"segmenter": state["segmenter"], "epoch_start": 1, "best_val": np.float64(3.5)}, published)
    evaluated = run(small_run(tmp_path / "b", *common, "--init-checkpoint", str(published), "--evaluate"))
    assert set(evaluated["eval"]) == {"rgb", "depth", "ensemble"}


BAD_FLAGS = {
    "zero batch": (["--batch-size", "0"], "--batch-size must be positive; got 0"),
    "zero val batch": (["--val-batch-size", "0"], "--val-batch-size must be positive; got 0"),
    "negative steps": (["--max-steps", "-3"], "--max-steps must be positive; got -3"),
    "zero epochs": (["--epochs", "0"], "--epochs must be positive; got 0"),
    "zero scene": (["--synthetic-size", "0", "0"], "--synthetic-size must be positive; got 0 0"),
    "zero crop": (["--crop-size", "32", "0"], "--crop-size must be positive; got 32 0"),
    "negative eval": (["--eval-every", "-1"], "--eval-every must be non-negative; got -1"),
    "negative workers": (["--workers", "-2"], "--workers must be non-negative; got -2"),
    "drop path 2": (["--dpr", "2.0"], r"--dpr must be in \[0, 1\); got 2.0"),
    "drop path nan": (["--dpr", "nan"], r"--dpr must be in \[0, 1\); got nan"),
    "dropout 1": (["--decoder-dropout", "1"], r"--decoder-dropout must be in \[0, 1\); got 1.0"),
    "negative lr": (["--lr=-1e-4"], r"--lr must be in \[0, inf\); got -0.0001"),
    "no gpu": (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
    "not a device": (["--device", "gpu0"], "--device 'gpu0' is not a device"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_rejected_before_training(case, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "no gpu" also on a GPU machine
    flags, message = BAD_FLAGS[case]
    with pytest.raises(SystemExit) as exc:
        parse_args(["--synthetic-size", "32", "32", *flags])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err), message


@pytest.mark.parametrize("flag", ["--resume", "--init-checkpoint", "--pretrained"])
def test_checkpoint_flags_name_a_bad_path(tmp_path, flag, capsys):
    text, js, missing = tmp_path / "notes.txt", tmp_path / "ck.json", tmp_path / "missing.pth.tar"
    text.write_text("hello\n")
    js.write_text('{"segmenter": {}}')
    for path, why in ((text, "is not a PyTorch checkpoint"), (js, "is not a PyTorch checkpoint"),
                      (missing, "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit):
            parse_args([flag, str(path)])
        err = capsys.readouterr().err
        assert f"{flag}: checkpoint file '{path}' {why}" in err, err


def test_eval_every_zero_evaluates_at_the_end_only(tmp_path):
    """--eval-every 0 died with ZeroDivisionError after the first epoch; it evaluates at the end only."""
    out = run(small_run(tmp_path, "--fusion-backend", "torch", "--dpr", "0", "--eval-every", "0",
                        "--max-steps", "4"))  # 3 steps per epoch: one epoch boundary, then the end
    assert out["step"] == 4 and out["eval"]
    evaluations = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evaluations] == [4]


def test_resume_from_a_segmenter_only_file_is_a_clear_error(tmp_path):
    model = build_model("mit_b0", num_classes=SyntheticRGBD.num_classes, fusion_backend="torch")
    path = tmp_path / "published.pth.tar"
    torch.save({"segmenter": to_published_state_dict(model), "epoch_start": 0, "best_val": np.float64(1.0)}, path)
    with pytest.raises(ValueError, match=rf"--resume {path}: not a checkpoint written by this script \(it lacks "
                                         r"\['optimizer', 'step', 'rng'\].*use --init-checkpoint"):
        run(small_run(tmp_path, "--fusion-backend", "torch", "--resume", str(path)))


def test_resume_takes_the_model_settings_from_the_checkpoint(tmp_path):
    """Issue 12: --resume without repeating --backbone (default mit_b3) failed with size mismatches; the
    checkpoint's settings are used, and an explicit conflicting flag is a clear error."""
    common = ["--fusion-backend", "torch", "--dpr", "0", "--eval-every", "100"]
    run(small_run(tmp_path, *common, "--max-steps", "1"))
    last = str(tmp_path / "last.pth.tar")
    bare = ["--synthetic-size", "32", "32", "--synthetic-train", "6", "--synthetic-val", "2", "--val-batch-size",
            "2", "--workers", "0", "--quiet", "--fusion-backend", "torch", "--eval-every", "100", "--resume", last]
    resumed = run(parse_args([*bare, "--max-steps", "2"]))
    assert resumed["step"] == 2 and len(resumed["losses"]) == 1
    with pytest.raises(ValueError, match=r"--backbone mit_b1 conflicts with the checkpoint .*last\.pth\.tar, "
                                         r"which was trained with --backbone mit_b0"):
        run(parse_args([*bare, "--max-steps", "3", "--backbone", "mit_b1"]))


def test_resume_with_more_steps_keeps_the_lr_schedule(tmp_path):
    """Issue 12: a larger --max-steps on resume recomputed the poly decay with the new total (the LR
    jumped from 1/3 to 1/2 of its peak here); the first resumed step uses the original run's LR."""
    common = ["--fusion-backend", "torch", "--dpr", "0", "--eval-every", "100", "--warmup-iters", "1"]
    run(small_run(tmp_path, *common, "--max-steps", "3"))
    run(small_run(tmp_path, *common, "--max-steps", "6", "--resume", str(tmp_path / "last.pth.tar")))
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    assert lrs[4] == pytest.approx(2e-4 * lr_factor(3, 1, 3, 1e-6, 1.0))
    assert lrs[4] <= lrs[3]


def test_runs_get_a_fresh_out_dir_and_say_where_the_checkpoint_is(tmp_path, monkeypatch, capsys):
    """Issue 12: every run wrote into runs/gemini_seg, silently overwriting; the default is a fresh
    timestamped directory, a non-empty --out-dir is refused without --resume / --overwrite, and the
    end of a run prints the checkpoint's path."""
    monkeypatch.chdir(tmp_path)
    first = parse_args([])
    assert os.path.dirname(first.out_dir) == os.path.join("runs", "gemini_seg") and not os.path.exists(first.out_dir)
    os.makedirs(first.out_dir)
    assert parse_args([]).out_dir != first.out_dir
    out = run(small_run(tmp_path / "a", "--fusion-backend", "torch", "--dpr", "0", "--max-steps", "1"))
    assert out["checkpoint"] == str(tmp_path / "a" / "last.pth.tar") and os.path.isfile(out["checkpoint"])
    assert f"checkpoint saved to {out['checkpoint']}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        small_run(tmp_path / "a")
    assert exc.value.code == 2
    assert f"--out-dir {tmp_path / 'a'} exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert small_run(tmp_path / "a", "--overwrite").out_dir == str(tmp_path / "a")
    assert parse_args(["--resume", out["checkpoint"]]).out_dir == str(tmp_path / "a")


def test_interrupt_saves_a_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    """Issue 12: Ctrl-C saved nothing and a killed save left its temp file behind. Here the interrupt
    lands inside the save of step 1 (--save-every 1): its temp file is removed, the checkpoint of step 1
    is saved, the message says where, the exit code is 130; a stale temp file is removed on resume."""
    real_save, calls = torch.save, []

    def interrupted_save(obj, path, *a, **k):
        calls.append(path)
        real_save(obj, path, *a, **k)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    flags = ["--backbone", "mit_b0", "--synthetic-size", "32", "32", "--synthetic-train", "6", "--synthetic-val",
             "2", "--workers", "0", "--quiet", "--fusion-backend", "torch", "--dpr", "0", "--eval-every", "100",
             "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        train_cli.main([*flags, "--max-steps", "3", "--save-every", "1"])
    assert exc.value.code == 130
    last = tmp_path / "last.pth.tar"
    assert f"interrupted at step 1; checkpoint saved to {last}" in capsys.readouterr().out
    assert load_checkpoint_file(last)["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    (tmp_path / "best.pth.tar.tmp").write_bytes(b"half a checkpoint")  # as a killed save leaves it
    resumed = run(parse_args([*flags, "--max-steps", "2", "--resume", str(last)]))
    assert resumed["step"] == 2 and not list(tmp_path.glob("*.tmp"))


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun, 2 processes x batch 2 on gloo ~ 1 process x batch 4 (same samples, BN frozen, no
    stochastic depth or dropout): DDP averages the gradients of the two halves of each global batch.

    Not bit-equal: each process averages its loss over its own valid pixels (crop padding is ignored),
    as published, which is not the mean over the global batch, and Adam's first steps move every weight
    by about +-lr whatever the gradient's size. Without gradient averaging the run would land as far
    from the batch-4 run as a batch-2 run does."""
    args = ["--backbone", "mit_b0", "--synthetic-size", "32", "32", "--synthetic-train", "8",
            "--synthetic-val", "2", "--val-batch-size", "2", "--workers", "0", "--warmup-iters", "2",
            "--lr", "2e-4", "--dpr", "0", "--decoder-dropout", "0", "--max-steps", "2", "--quiet",
            "--fusion-backend", "torch"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gemini_seg.train", *args, "--batch-size", "2", "--out-dir", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world=2" in done.stdout
    run(parse_args([*args, "--batch-size", "4", "--out-dir", str(tmp_path / "one")]))
    run(parse_args([*args, "--batch-size", "2", "--out-dir", str(tmp_path / "half")]))
    ddp = load_checkpoint_file(tmp_path / "ddp" / "last.pth.tar")["segmenter"]
    one = load_checkpoint_file(tmp_path / "one" / "last.pth.tar")["segmenter"]
    half = load_checkpoint_file(tmp_path / "half" / "last.pth.tar")["segmenter"]

    def distance(a, b):
        num = sum((a[k].double() - b[k].double()).norm() ** 2 for k in a if a[k].is_floating_point())
        return float(num ** 0.5)

    assert distance(ddp, one) < 0.25 * distance(half, one), (distance(ddp, one), distance(half, one))


def test_bf16_autocast_step_on_cpu(tmp_path):
    out = run(small_run(tmp_path, "--fusion-backend", "torch", "--max-steps", "1", "--amp", "bf16"))
    assert len(out["losses"]) == 1 and all(np.isfinite(out["losses"]))


# ----------------------------------------------------------------------------------------------- data


def test_synthetic_scenes_are_deterministic_and_need_depth():
    ds = SyntheticRGBD(length=16, size=(48, 48), seed=5, train=False)
    a, b = ds.scene(3), ds.scene(3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(ds.scene(4)[2], a[2])
    labels = np.concatenate([ds.scene(i)[2].ravel() for i in range(16)])
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    rgb, depth, label = a
    assert rgb.shape == depth.shape == (48, 48, 3) and rgb.dtype == depth.dtype == np.uint8
    assert np.array_equal(depth[..., 0], depth[..., 2])
    near = depth[..., 0][label == 1].astype(float).mean()
    far = depth[..., 0][label == 2].astype(float).mean() if (label == 2).any() else 255
    assert near < far
    sample = SyntheticRGBD(length=4, size=(48, 48), seed=5, train=True, crop_size=(32, 32))[0]
    assert sample["rgb"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)


def write_folder_sample(root, dataset):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    rgb_dir, mask_dir, depth_dir, ext = (("rgb", "masks", "depth", "png") if dataset == "nyudv2"
                                         else ("RGB", "labels", "Depth", "jpg"))
    lines, arrays = [], []
    for i in range(2):
        rgb = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
        depth = rng.integers(0, 256, (32, 64), dtype=np.uint8)
        mask = rng.integers(0, 40 if dataset == "nyudv2" else 38, (32, 64)).astype(np.uint8)
        if dataset == "nyudv2":
            mask[:4] = 255
        name = f"{i:06d}"
        for sub, arr, e in ((rgb_dir, rgb, ext), (depth_dir, depth, "png"), (mask_dir, mask, "png")):
            os.makedirs(root / sub, exist_ok=True)
            Image.fromarray(arr).save(root / sub / f"{name}.{e}")
        lines.append(f"{rgb_dir}/{name}.{ext}\t{mask_dir}/{name}.png\t{depth_dir}/{name}.png")
        arrays.append((rgb, depth, mask))
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return arrays


@pytest.mark.parametrize("dataset", ["nyudv2", "sunrgbd"])
def test_folder_loaders_published_layout(tmp_path, dataset):
    arrays = write_folder_sample(tmp_path, dataset)
    val = FolderRGBD(dataset, str(tmp_path), str(tmp_path / "train.txt"), train=False, crop_size=(32, 32))
    assert len(val) == 2 and val.num_classes == (40 if dataset == "nyudv2" else 37)
    sample = val[1]
    rgb, depth, mask = arrays[1]
    # 32x64 is already a multiple of 32 with short side 32: evaluation resizing is the identity.
    assert torch.allclose(sample["depth"], torch.from_numpy(depth).float().expand(3, -1, -1) / 255.0)
    expected_mask = mask.astype(np.int64)
    if dataset == "sunrgbd":
        expected_mask = np.where(mask == 0, 255, expected_mask - 1)
    assert torch.equal(sample["mask"], torch.from_numpy(expected_mask))
    if dataset == "nyudv2":  # lossless PNG: RGB normalised with the ImageNet statistics
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0 - mean) / std
        assert torch.allclose(sample["rgb"], expected, atol=1e-5)
    train = FolderRGBD(dataset, str(tmp_path), str(tmp_path / "train.txt"), train=True, crop_size=(24, 24))
    for epoch in range(3):
        train.set_epoch(epoch)
        s = train[0]
        assert s["rgb"].shape == s["depth"].shape == (3, 24, 24) and s["mask"].shape == (24, 24)
        values = set(s["mask"].unique().tolist())
        assert values <= set(range(train.num_classes)) | {255}
    (tmp_path / "bad.txt").write_text("rgb/000000.png\tmasks/000000.png\n")
    with pytest.raises(ValueError, match="expected 3 tab-separated paths"):
        FolderRGBD(dataset, str(tmp_path), str(tmp_path / "bad.txt"), train=False, crop_size=(32, 32))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_bf16_training_step_every_backend_matches_oracle():
    """MiT-B0 on CUDA under bf16 autocast: every CUDA backend's logits, loss and parameter gradients
    agree with the oracle backend's."""
    torch.manual_seed(0)
    model = build_model("mit_b0", num_classes=40, fusion_backend="torch", drop_path_rate=0.0,
                        decoder_dropout=0.0).cuda()
    x = [t.cuda() for t in images(batch=2, size=128)]
    target = torch.randint(0, 40, (2, 128, 128), device="cuda")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for backend in gemini_kernels.available_backends("cuda"):
        model.load_state_dict(state)
        model.set_fusion_backend(backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        loss = sum(torch.nn.functional.cross_entropy(
            torch.nn.functional.interpolate(o.float(), size=(128, 128), mode="bilinear"), target) for o in out)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[backend] = (out[0].float().detach(), loss.item(), grads)
        model.zero_grad(set_to_none=True)
    ref_logits, ref_loss, ref_grads = results["torch"]
    for backend, (logits, loss, grads) in results.items():
        assert rel_err(logits, ref_logits) < 2e-2, backend
        assert abs(loss - ref_loss) / ref_loss < 1e-2, backend
        assert grads.shape == ref_grads.shape and rel_err(grads, ref_grads) < 5e-2, backend
