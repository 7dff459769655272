"""The Swin and DeLiVER GeminiFusion models against the restated published ones (published_models.py),
their released checkpoint layouts both ways, and the backends on them."""
import numpy as np
import pytest
import torch

import gemini_kernels
import published_models as P
from gemini_seg import (SWIN_CONFIGS, build_deliver_model, build_model, load_published_checkpoint,
                        to_published_state_dict)
from gemini_seg.checkpoint import published_names
from helpers import one_thread, randomise_, rel_err  # noqa: F401  (one_thread: an autouse fixture)

CPU_BACKENDS = [b for b in gemini_kernels.available_backends("cpu") if b != "torch"]


def images(count, batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, height, width, generator=g, dtype=torch.float64) for _ in range(count)]


def strip(key):
    return key[len("module."):] if key.startswith("module.") else key


def loss_of(outputs, seed):
    """A random linear functional of every output (ensemble included, so alpha gets a gradient)."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)


def grads_by_published_name(model, names=None):
    names = names or {k: k for k, _ in model.named_parameters()}
    return {strip(names[k]): p.grad for k, p in model.named_parameters()}


def assert_same_grads(ours, ours_names, published, tol):
    mine = grads_by_published_name(ours, ours_names)
    theirs = grads_by_published_name(published)
    assert mine.keys() == theirs.keys()
    checked = 0
    for name, g in theirs.items():
        if g is None:  # the DeLiVER model's last score net of each stage: in the state, never used
            assert mine[name] is None or mine[name].abs().max() == 0, name
            continue
        assert rel_err(mine[name], g) < tol, name
        checked += 1
    return checked


# ---------------------------------------------------------------------------------------------- Swin


@pytest.fixture(scope="module")
def swin_pair():
    """swin_tiny here and restated, float64, the published tensors loaded into ours from a state the
    way main.py's Saver stores it (DDP names)."""
    torch.manual_seed(0)
    published = P.WeTrSwin("swin_tiny", num_classes=5, dpr=0.0).double()
    randomise_(published, seed=1)
    ours = build_model("swin_tiny", num_classes=5, fusion_backend="torch", drop_path_rate=0.0).double()
    extras = load_published_checkpoint(ours, {"segmenter": {"module." + k: v for k, v in published.state_dict().items()},
                                              "epoch_start": 3, "best_val": np.float64(52.2)})
    assert extras == {"epoch_start": 3, "best_val": 52.2}
    return ours.eval(), published.eval()


def test_swin_tiny_equals_published_outputs_and_weight_gradients(swin_pair):
    ours, published = swin_pair
    # 20x28: token maps 5x7 -> 3x4 -> 2x2 -> 1x1: window padding (maps smaller than a window, which the
    # published code pads rather than shrinking the window), odd patch merging, shifted masks.
    x = images(2, 2, 20, 28, seed=2)
    ours.zero_grad(), published.zero_grad()
    mine = ours(x)
    theirs, _ = published([t.clone() for t in x])
    assert [tuple(o.shape) for o in mine] == [(2, 5, 5, 7)] * 3
    for a, b in zip(mine, theirs):
        assert rel_err(a, b) < 1e-10
    loss_of(mine, 3).backward()
    loss_of(theirs, 3).backward()
    assert assert_same_grads(ours, published_names(ours), published, 1e-10) == sum(
        1 for _ in published.parameters())

    # Not vacuous: without the fusion layers the same weights give other logits.
    plain = build_model("swin_tiny", num_classes=5, fusion=False, drop_path_rate=0.0).double().eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if ".fusion." not in k})
    with torch.no_grad():
        assert rel_err(plain(x)[0], mine[0]) > 1e-3


def backend_run(model, inputs, backend, seed):
    model.set_fusion_backend(backend)
    model.zero_grad()
    out = model(inputs)
    loss_of(out, seed).backward()
    model.set_fusion_backend("torch")
    return [o.detach() for o in out], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_backend_matches(model, inputs, backend, reference, seed):
    ref_out, ref_grads = reference
    out, grads = backend_run(model, inputs, backend, seed)
    for a, b in zip(out, ref_out):
        assert rel_err(a, b) < 1e-8
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        assert rel_err(grads[k], g) < 1e-8, k


@pytest.fixture(scope="module")
def swin_small_input_reference(swin_pair):
    """The torch backend's outputs and gradients at the small input, computed once for every backend."""
    x = images(2, 1, 4, 12, seed=4)  # maps 1x3 -> 1x2 -> 1x1 -> 1x1: small for the Triton interpreter
    return x, backend_run(swin_pair[0], x, "torch", 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swin_tiny_backends_match_torch(swin_pair, swin_small_input_reference, backend):
    x, reference = swin_small_input_reference
    assert_backend_matches(swin_pair[0], x, backend, reference, 5)


def test_swin_interface_and_errors():
    torch.manual_seed(0)
    model = build_model("swin_tiny", num_classes=3, fusion_backend="torch")
    fusions = [m for m in model.modules() if isinstance(m, gemini_kernels.GeminiFusion)]
    assert len(fusions) == 12 and {f.num_heads for f in fusions} == {8}
    assert [f.dim for f in fusions] == [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2
    model.set_fusion_backend("cuda")
    assert {f.backend for f in fusions} == {"cuda"}
    with pytest.raises(ValueError, match="multiples of 4"):
        model([torch.randn(1, 3, 30, 32)] * 2)
    with pytest.raises(ValueError, match="inputs must be a list of 2"):
        model([torch.randn(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_model("swin_huge")


@pytest.mark.parametrize("name", sorted(SWIN_CONFIGS))
def test_swin_variants_names_and_shapes_on_meta(name):
    with torch.device("meta"):
        ours = build_model(name, num_classes=40)
        published = P.WeTrSwin(name, num_classes=40)
    state = to_published_state_dict(ours)
    expected = {"module." + k: tuple(v.shape) for k, v in published.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    window = 12 if "window12" in name else 7
    table = state["module.encoder.body.layers.3.blocks.1.attn.module.relative_position_bias_table"]
    assert table.shape[0] == (2 * window - 1) ** 2
    if "large" in name:  # stage 4 of Swin-L is 1536 wide: its fusion layer too
        assert state["module.encoder.body.layers.3.blocks.0.cross_attn_0_to_1.in_proj_weight"].shape == (4608, 1536)
        assert state["module.decoder.linear_c4.proj.weight"].shape == (256, 1536)
    # Both ways on the meta device: the published names load back with nothing left over.
    assert load_published_checkpoint(ours, {"segmenter": state}) == {}


# ------------------------------------------------------------------------------------------- DeLiVER

MODALITY_SETS = [("img", "depth"), ("img", "depth", "event"), ("img", "depth", "event", "lidar")]


def deliver_pair(modalities, seed=0):
    torch.manual_seed(seed)
    published = P.DeliverGeminiFusion("GeminiFusion-B0", 5, list(modalities)).double()
    randomise_(published, seed=seed + 1)
    ours = build_deliver_model("mit_b0", num_classes=5, fusion_backend="torch", modalities=modalities).double()
    assert load_published_checkpoint(ours, published.state_dict()) == {}  # the bare best-model .pth
    return ours.eval(), published.eval()


@pytest.mark.parametrize("modalities", MODALITY_SETS, ids=len)
def test_deliver_b0_equals_published(modalities):
    ours, published = deliver_pair(modalities)
    # Any size: logits come back at 33x73. (Wide enough that every stage's spatial reduction keeps two
    # keys: with one, the softmax is constant and the q gradients are zero up to rounding.)
    x = images(len(modalities), 2, 33, 73, seed=7)
    mine = ours(x)
    theirs = published([t.clone() for t in x])
    assert [tuple(o.shape) for o in mine] == [(2, 5, 33, 73)] * 3
    for a, b in zip(mine, theirs):
        assert rel_err(a, b) < 1e-10
    loss_of(mine, 8).backward()
    loss_of(theirs, 8).backward()
    checked = assert_same_grads(ours, published_names(ours), published, 1e-10)
    # The last score net of each of the 4 stages (2 convs, weight and bias) has no gradient.
    unused = 4 * 4 if len(modalities) > 2 else 0
    assert checked == sum(1 for _ in published.parameters()) - unused
    assert ours.alpha.grad is not None and ours.alpha.grad.abs().sum() > 0  # alpha is trained
    if len(modalities) > 2:  # every extra modality reaches the logits through its score net
        for i in range(len(modalities) - 1):
            assert ours.encoder.extra_score_predictor[0].score_nets[i][1].weight.grad.abs().sum() > 0


_DELIVER_REFERENCES = {}


def deliver_reference(modalities):
    """A randomised float64 DeLiVER B0 (ours only), an input, and the torch backend's outputs and
    gradients on it: computed once per modality set for every backend."""
    if modalities not in _DELIVER_REFERENCES:
        torch.manual_seed(10)
        model = build_deliver_model("mit_b0", num_classes=5, fusion_backend="torch", modalities=modalities)
        model = model.double().eval()
        randomise_(model, seed=11)
        x = images(len(modalities), 1, 33, 65, seed=11)
        _DELIVER_REFERENCES[modalities] = model, x, backend_run(model, x, "torch", 12)
    return _DELIVER_REFERENCES[modalities]


# Every CPU backend (the Triton one under the interpreter: ~3 s a case) at 2, 3 and 4 modalities.
BACKEND_CASES = [(m, b) for m in MODALITY_SETS for b in CPU_BACKENDS]


@pytest.mark.parametrize("modalities, backend", BACKEND_CASES, ids=lambda v: v if isinstance(v, str) else len(v))
def test_deliver_b0_backends_match_torch(modalities, backend):
    model, x, reference = deliver_reference(modalities)
    assert_backend_matches(model, x, backend, reference, 12)


@pytest.mark.parametrize("backbone, modalities", [("mit_b0", m) for m in MODALITY_SETS]
                         + [("mit_b2", MODALITY_SETS[0]), ("mit_b2", MODALITY_SETS[2])],
                         ids=lambda v: v if isinstance(v, str) else str(len(v)))
def test_deliver_names_and_shapes_on_meta(backbone, modalities):
    variant = "B" + backbone[-1]
    with torch.device("meta"):
        ours = build_deliver_model(backbone, modalities=modalities)
        published = P.DeliverGeminiFusion(f"GeminiFusion-{variant}", 25, list(modalities))
    state = to_published_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in published.state_dict().items()}
    m = len(modalities)
    assert f"backbone.patch_embed3.norm.ln_{m - 1}.weight" in state and f"backbone.block1.0.norm1.ln_2.weight" not in state
    assert state["decode_head.linear_fuse.conv.weight"].shape[0] == 512  # whatever the backbone
    assert (f"backbone.extra_score_predictor.3.score_nets.{m - 1}.1.weight" in state) == (m > 2)
    assert load_published_checkpoint(ours, state) == {}


def test_deliver_arguments_are_checked():
    for bad in [("img",), ("depth", "img"), ("img", "depth", "depth"), ("img", "thermal"), "img"]:
        with pytest.raises(ValueError, match="modalities"):
            build_deliver_model("mit_b0", modalities=bad)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_deliver_model("swin_tiny")
    with pytest.raises(ValueError, match="fusion_backend"):
        build_deliver_model("mit_b0", fusion_backend="tpu")
    with torch.device("meta"):
        model = build_deliver_model("mit_b0", modalities=("img", "lidar", "event"))
    with pytest.raises(ValueError, match="list of 3 image batches"):
        model([torch.zeros(1, 3, 32, 32, device="meta")] * 2)
    with pytest.raises(ValueError, match="one shape"):
        model([torch.zeros(1, 3, 32, 32, device="meta")] * 2 + [torch.zeros(1, 3, 32, 48, device="meta")])


# --------------------------------------------------------------------------- released files, both ways


def assert_bit_for_bit(state, reference):
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_swin_released_file_loads_and_goes_back_bit_for_bit(swin_pair, tmp_path):
    _, published = swin_pair
    # As main.py's Saver writes it: DDP(WeTr).state_dict() under "segmenter", a NumPy best_val.
    segmenter = {"module." + k: v.float() if v.is_floating_point() else v for k, v in published.state_dict().items()}
    path = tmp_path / "model-best.pth.tar"
    torch.save({"segmenter": segmenter, "epoch_start": 11, "best_val": np.float64(52.2)}, path)

    fresh = build_model("swin_tiny", num_classes=5, drop_path_rate=0.0)
    extras = load_published_checkpoint(fresh, str(path))
    assert extras == {"epoch_start": 11, "best_val": 52.2} and type(extras["best_val"]) is np.float64
    back = to_published_state_dict(fresh)
    assert_bit_for_bit(back, segmenter)
    own = fresh.state_dict()  # a renaming of the model's own tensors, not copies
    assert {t.data_ptr() for t in back.values()} == {t.data_ptr() for t in own.values()}

    # A file trained for another class count (the published SUN -> NYUDv2 fine-tuning): the classifier
    # is skipped on request, and refused with the shapes named otherwise.
    other = dict(segmenter, **{"module.decoder.linear_pred.weight": torch.randn(3, 256, 1, 1),
                               "module.decoder.linear_pred.bias": torch.randn(3)})
    before = fresh.decoder.linear_pred.weight.clone()
    with pytest.raises(ValueError, match=r"module\.decoder\.linear_pred\.weight: \(3, 256, 1, 1\)"):
        load_published_checkpoint(fresh, {"segmenter": other})
    assert load_published_checkpoint(fresh, {"segmenter": other}, exclude=("decoder.linear_pred.",)) == {}
    assert torch.equal(fresh.decoder.linear_pred.weight, before)


def deliver_optimizer(model):
    """DeLiVER semseg/optimizers.py get_optimizer("adamw")."""
    wd, nowd, dec = [], [], []
    for n, p in model.named_parameters():
        (dec if "decode_head" in n else nowd if p.dim() == 1 else wd).append(p)
    return torch.optim.AdamW([{"params": wd}, {"params": nowd, "weight_decay": 0},
                              {"params": dec, "lr": 2e-3}], 2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def test_deliver_released_files_load_and_go_back_bit_for_bit(tmp_path):
    modalities = ("img", "depth", "event", "lidar")
    torch.manual_seed(20)
    published = P.DeliverGeminiFusion("GeminiFusion-B0", 25, list(modalities))
    randomise_(published, seed=21)
    optimizer = deliver_optimizer(published)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / 100) ** 0.9)
    loss = published([torch.randn(1, 3, 32, 32) for _ in modalities])[0].square().mean()
    loss.backward()
    optimizer.step(), scheduler.step()
    state = published.state_dict()
    # tools/train_mm.py: the best model as a bare state_dict, and the resume file beside it.
    best = tmp_path / "GeminiFusion_GeminiFusionBackbone-B0_DELIVER_epoch3_51.2.pth"
    resume = tmp_path / "GeminiFusion_GeminiFusionBackbone-B0_DELIVER_epoch3_51.2_checkpoint.pth"
    torch.save(state, best)
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                "loss": loss.item(), "scheduler_state_dict": scheduler.state_dict(), "best_miou": 51.2}, resume)

    ours = build_deliver_model("mit_b0", num_classes=25, fusion_backend="torch", modalities=modalities)
    assert load_published_checkpoint(ours, str(best)) == {}
    assert_bit_for_bit(to_published_state_dict(ours), state)
    x = [torch.randn(1, 3, 40, 36) for _ in modalities]
    with torch.no_grad():
        for a, b in zip(ours.eval()(x), published.eval()(x)):
            assert rel_err(a, b) < 1e-5

    fresh = build_deliver_model("mit_b0", num_classes=25, modalities=modalities)
    extras = load_published_checkpoint(fresh, str(resume))
    assert set(extras) == {"epoch", "optimizer_state_dict", "loss", "scheduler_state_dict", "best_miou"}
    assert extras["epoch"] == 3 and extras["best_miou"] == 51.2
    assert len(extras["optimizer_state_dict"]["state"]) == sum(p.grad is not None for p in published.parameters())
    assert_bit_for_bit(to_published_state_dict(fresh), state)

    # Strict both ways, the offending keys named.
    broken = dict(state)
    del broken["backbone.extra_score_predictor.2.score_nets.3.1.bias"]  # the never-used score net too
    broken["backbone.block1.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"1 model entries unfilled \[encoder\.extra_score_predictor\.2\.score_nets"
                                       r"\.3\.1\.bias\], 1 checkpoint keys unmapped \[backbone\.block1\.0\.attn\.extra"):
        load_published_checkpoint(fresh, broken)
    # A 4-modality file into a 3-modality model: the fourth patch-embed norms and score nets are left over.
    with pytest.raises(KeyError, match=r"0 model entries unfilled \[\], 24 checkpoint keys unmapped"):
        load_published_checkpoint(build_deliver_model("mit_b0", modalities=modalities[:3]), state)
    with pytest.raises(TypeError, match="exclude must be a sequence"):
        load_published_checkpoint(fresh, state, exclude="decoder.linear_pred.")
    with pytest.raises(TypeError, match="source must be a checkpoint path"):
        load_published_checkpoint(fresh, 3)


# ----------------------------------------------------------------------- training on synthetic DeLiVER


def test_synthetic_deliver_scenes_need_the_event_camera():
    from gemini_seg.data import SyntheticDeliver

    data = SyntheticDeliver(length=6, size=(48, 64), seed=3, train=False)
    assert data.keys == ("rgb", "depth", "event", "lidar") and data.num_classes == 5
    for i in range(len(data)):
        rgb, depth, event, lidar, label = data.scene(i)
        moving = label == 4
        assert moving.any()
        # Moving objects sit at the background plane's depth (as decals do): depth cannot see them ...
        plane = 255 * (1.0 - 0.2 * (1.0 - np.mgrid[0:48, 0:64][0] / 47.0))
        assert np.abs(depth[moving, 0] - plane[moving]).mean() < 8
        # ... but events fire on their boundaries far more often than anywhere else.
        fired = event[..., :2].max(-1) > 0
        edge = moving & ~np.roll(moving, 1, axis=1) | moving & ~np.roll(moving, -1, axis=1)
        assert fired[edge].mean() > 5 * fired[~moving].mean()
        assert (lidar[1::3, :, 1] == 0).all() and (lidar[0::3, :, 1] == 255).all()  # scan lines only
    sample = data[0]
    assert set(sample) == {"rgb", "depth", "event", "lidar", "mask"} and sample["event"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="modalities"):
        SyntheticDeliver(modalities=("depth", "img"))


def test_deliver_b0_trains_on_four_synthetic_modalities():
    """The published DeLiVER recipe in small (AdamW, the three groups, a loss on every output) on the
    embedded scenes: the 4-modality model's loss falls."""
    from gemini_seg.data import SyntheticDeliver

    torch.manual_seed(0)
    data = SyntheticDeliver(length=4, size=(32, 32), seed=1, train=True)
    batch = [data[i] for i in range(len(data))]
    inputs = [torch.stack([s[k] for s in batch]) for k in data.keys]
    target = torch.stack([s["mask"] for s in batch])
    model = build_deliver_model("mit_b0", num_classes=data.num_classes, fusion_backend="cuda",
                                modalities=data.modalities).train()
    decayed, plain, decoder = model.param_groups()
    assert model.alpha in plain
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": plain, "weight_decay": 0.0},
                                   {"params": decoder, "lr": 2e-3}], lr=2e-4, weight_decay=0.01)
    losses = []
    for _ in range(6):
        outputs = model(inputs)
        loss = sum(torch.nn.functional.cross_entropy(o, target, ignore_index=255) for o in outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
    assert not torch.equal(model.alpha.detach(), torch.ones(2))  # alpha is trained


def test_train_cli_takes_the_swin_backbones(tmp_path, capsys):
    from gemini_seg.train import main, parse_args

    args = parse_args(["--dataset", "synthetic", "--backbone", "swin_tiny", "--out-dir", str(tmp_path / "r")])
    assert args.backbone == "swin_tiny"
    with pytest.raises(SystemExit):
        main(["--dataset", "synthetic", "--backbone", "swin_tiny", "--pretrained", __file__])
    assert "--pretrained takes SegFormer's ImageNet mit_b*.pth" in capsys.readouterr().err
