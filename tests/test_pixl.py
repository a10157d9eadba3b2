"""PiXL pixel loss (method.md section 8): partition counts and schedule, prototypes, a closed-form
InfoNCE, one-way gradients, option errors, and both extensions (PiXL + mean teacher) driven through a
small fake fine-tuning loop with save / restore mid-run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fake_loop import SegOutput, TinySegmentor, fake_context
from torch import nn

from unip_train.checkpointing import load_checkpoint, save_checkpoint
from unip_train.finetune import pixl as pixl_mod
from unip_train.finetune.augment import TrainAugment
from unip_train.finetune.dataset import SegDataset
from unip_train.finetune.layouts import IGNORE_INDEX
from unip_train.finetune.pixl import (
    PixlError,
    PixlExtension,
    ProjectionHead,
    choose_prototypes,
    class_prototypes,
    drift_count,
    eta_at,
    normalized_entropy,
    pair_groups,
    partition,
    pixl_loss,
)
from unip_train.finetune.semi import MeanTeacherExtension, ema_alpha, prepare_semi
from unip_train.synthetic import generate

# --- helpers ----------------------------------------------------------------------------------------


def probs_from_confidence(labels: torch.Tensor, confidence: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Softmax of ``confidence * onehot(label)``: higher confidence, lower entropy (255 -> class 0)."""
    onehot = F.one_hot(labels.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return torch.softmax(confidence[:, None] * onehot, dim=1)


def unit(*v: float) -> torch.Tensor:
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def random_case(seed: int, n: int = 2, c: int = 4, d: int = 6, h: int = 5, w: int = 6):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, h, w, generator=g), dim=1)
    probs = torch.softmax(3 * torch.randn(n, c, h, w, generator=g), dim=1)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE_INDEX
    return emb, probs, labels


# --- partition and schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.07, 0.2, 0.3, 0.5, 1.0])
def test_partition_has_ceil_eta_drift_pixels_and_ignores_255(eta: float):
    _, probs, labels = random_case(0, n=3, h=7, w=9)
    labels[2] = IGNORE_INDEX  # an image without any valid pixel
    joint, drift = partition(probs, labels, eta)
    valid = labels != IGNORE_INDEX
    ent = normalized_entropy(probs)
    for i in range(3):
        n_valid = int(valid[i].sum())
        assert int(drift[i].sum()) == math.ceil(round(eta * n_valid, 9))
        assert not (drift[i] & ~valid[i]).any() and not (joint[i] & ~valid[i]).any()  # 255: in neither
        assert not (joint[i] & drift[i]).any() and torch.equal(joint[i] | drift[i], valid[i])
        if drift[i].any() and joint[i].any():  # drift pixels are the most uncertain ones
            assert ent[i][drift[i]].min() >= ent[i][joint[i]].max()


def test_drift_count_is_exact_ceil_without_float_artefacts():
    assert drift_count(0.2, 10) == 2  # 0.2 * 10 is 2.0000000000000004 in exact binary arithmetic
    assert drift_count(0.1, 30) == 3 and drift_count(0.7, 10) == 7
    assert drift_count(0.25, 10) == 3 and drift_count(0.001, 5) == 1
    assert drift_count(0.0, 10) == 0 and drift_count(1.0, 10) == 10 and drift_count(0.5, 0) == 0


def test_eta_falls_linearly_from_first_to_last_step():
    total = 101
    assert eta_at(0, total) == 0.2
    assert eta_at(total - 1, total) == pytest.approx(0.001, abs=1e-15)
    assert eta_at(50, total) == pytest.approx((0.2 + 0.001) / 2)
    values = [eta_at(t, total) for t in range(total)]
    steps = [a - b for a, b in zip(values, values[1:])]
    assert all(s == pytest.approx(0.199 / 100) for s in steps)
    assert eta_at(total + 5, total) == pytest.approx(0.001)  # clamped past the end
    assert eta_at(0, 1) == 0.2 and eta_at(3, 10, 0.5, 0.1) == pytest.approx(0.5 - 0.4 * 3 / 9)


def test_extension_uses_the_schedule_at_each_step(monkeypatch):
    seen = []
    real = pixl_mod.pixl_loss
    monkeypatch.setattr(pixl_mod, "pixl_loss", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    ext = PixlExtension(feature_dim=4, eta="0.3,0.01")
    ext.setup(fake_context(TinySegmentor(dim=4), iters=11))
    emb, probs, labels = random_case(1, d=4, c=3)
    out = SegOutput(torch.log(probs), None, emb)
    for it in (0, 5, 10):
        ext.loss_terms(it, labels, out, None)
    assert seen == pytest.approx([0.3, 0.3 + (0.01 - 0.3) * 0.5, 0.01])


# --- prototypes -----------------------------------------------------------------------------------


def _hand_pair():
    """Two 1x4 images, 3 classes; eta 0.25 makes one drift pixel per image (the uniform-probability one)."""
    a = [unit(1, 0), unit(0.6, 0.8), unit(0, 1), unit(-1, 0)]
    b = [unit(0.8, 0.6), unit(0.8, -0.6), unit(-0.6, 0.8), unit(0.2, 1)]
    emb = torch.stack([torch.stack(a, 1), torch.stack(b, 1)])[:, :, None, :]  # [2, 2, 1, 4]
    labels = torch.tensor([[0, 0, 1, IGNORE_INDEX], [1, 0, 2, 2]])[:, None, :]
    confidence = torch.tensor([[6.0, 0.0, 5.0, 4.0], [7.0, 6.5, 5.5, 0.0]])[:, None, :]
    probs = probs_from_confidence(labels, confidence, 3)
    return emb, probs, labels, a, b


def test_prototypes_are_class_means_over_joint_pixels_of_the_pair():
    emb, probs, labels, a, b = _hand_pair()
    joint, drift = partition(probs, labels, 0.25)
    assert drift[0, 0].tolist() == [False, True, False, False]
    assert drift[1, 0].tolist() == [False, False, False, True]
    emb = emb.clone().requires_grad_(True)
    protos, counts = class_prototypes(emb, labels, joint, num_classes=4)
    assert counts.tolist() == [2, 2, 1, 0]  # class 3 is absent: no prototype
    expected = [F.normalize((a[0] + b[1]) / 2, dim=0), F.normalize((a[2] + b[0]) / 2, dim=0), b[2]]
    for c in range(3):
        torch.testing.assert_close(protos[c], expected[c])
    assert not protos.requires_grad and protos.grad_fn is None  # detached
    _, present = choose_prototypes([protos], [counts], [counts])
    assert present.tolist() == [True, True, True, False]


def test_scale_choice_per_class():
    protos = [torch.full((3, 2), 0.0), torch.full((3, 2), 1.0)]
    joint = [torch.tensor([4, 0, 1]), torch.tensor([2, 3, 1])]
    total = [torch.tensor([8, 4, 4]), torch.tensor([2, 3, 1])]
    chosen, present = choose_prototypes(protos, joint, total, "count")
    assert chosen[:, 0].tolist() == [0.0, 1.0, 0.0]  # more joint pixels; tie (class 2) -> first scale
    assert present.tolist() == [True, True, True]
    chosen, _ = choose_prototypes(protos, joint, total, "share")
    assert chosen[:, 0].tolist() == [1.0, 1.0, 1.0]  # larger joint share of the class's pixels
    _, present = choose_prototypes(protos, [torch.tensor([0, 0, 1])] * 2, total)
    assert present.tolist() == [False, False, True]


# --- the loss ---------------------------------------------------------------------------------------


def test_loss_equals_hand_computed_value():
    emb, probs, labels, a, b = _hand_pair()
    tau = 0.1
    loss = pixl_loss([emb], [probs], [labels], 0.25, [[0, 1]], tau)
    p = [F.normalize((a[0] + b[1]) / 2, dim=0), F.normalize((a[2] + b[0]) / 2, dim=0), b[2]]

    def nce(z, y):
        sims = [float(z @ q) / tau for q in p]
        return -sims[y] + math.log(sum(math.exp(s) for s in sims))

    assert float(loss) == pytest.approx((nce(a[1], 0) + nce(b[3], 2)) / 2, rel=1e-5)


def test_infonce_closed_form_with_orthogonal_prototypes():
    """Joint pixels e1 (class 0) and e2 (class 1); the drift pixel (cos t, sin t) of class 0:
    loss = log(1 + exp((sin t - cos t) / tau))."""
    t, tau = 0.4, 0.2
    emb = torch.stack([unit(1, 0), unit(0, 1), unit(math.cos(t), math.sin(t))], 1)[None, :, None, :]
    labels = torch.tensor([[[0, 1, 0]]])
    probs = probs_from_confidence(labels, torch.tensor([[[9.0, 9.0, 0.0]]]), 2)
    loss = pixl_loss([emb], [probs], [labels], 0.3, [[0]], tau)
    assert float(loss) == pytest.approx(math.log1p(math.exp((math.sin(t) - math.cos(t)) / tau)), rel=1e-6)


def test_loss_unchanged_under_pixel_permutation():
    emb, probs, labels = random_case(3)
    n, d, h, w = emb.shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(5))

    def shuffle(x):
        return x.flatten(-2)[..., perm].reshape(x.shape)

    kw = dict(eta=0.3, groups=[[0, 1]], tau=0.1)
    base = pixl_loss([emb], [probs], [labels], **kw)
    moved = pixl_loss([shuffle(emb)], [shuffle(probs)], [shuffle(labels)], **kw)
    assert float(base) > 0
    torch.testing.assert_close(moved, base)


@pytest.mark.parametrize("case", ["no drift", "single class", "all ignored", "no group"])
def test_loss_is_zero_not_nan_in_degenerate_cases(case: str):
    emb, probs, labels = random_case(4)
    eta, groups = 0.3, [[0, 1]]
    if case == "no drift":
        eta = 0.0
    elif case == "single class":
        labels = torch.where(labels == IGNORE_INDEX, labels, torch.zeros_like(labels))
    elif case == "all ignored":
        labels = torch.full_like(labels, IGNORE_INDEX)
    else:
        groups = []
    loss = pixl_loss(
        [emb, emb[..., ::2, ::2]], [probs, probs[..., ::2, ::2]], [labels, labels[..., ::2, ::2]], eta, groups
    )
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_gradient_reaches_drift_pixels_only():
    emb, probs, labels = random_case(6, h=6, w=6)
    emb = emb.requires_grad_(True)
    coarse = F.normalize(F.avg_pool2d(emb.detach(), 2), dim=1).requires_grad_(True)
    coarse_labels = labels[..., ::2, ::2]
    loss = pixl_loss(
        [emb, coarse], [probs, F.avg_pool2d(probs, 2)], [labels, coarse_labels], 0.3, [[0, 1]], 0.1
    )
    loss.backward()
    joint, drift = partition(probs, labels, 0.3)
    grad = emb.grad.permute(0, 2, 3, 1)
    assert torch.count_nonzero(grad[joint]) == 0  # exactly zero on joint pixels
    assert torch.count_nonzero(grad[labels == IGNORE_INDEX]) == 0
    assert (grad[drift].abs().sum(dim=1) > 0).float().mean() > 0.5  # drift pixels are pulled
    assert coarse.grad is None or torch.count_nonzero(coarse.grad) == 0  # prototypes only


def test_pair_groups():
    assert pair_groups(4) == [[0, 1], [2, 3]]
    assert pair_groups(3) == [[0, 1], [2]]
    assert pair_groups(2, 2) == [[0, 2], [1, 3]]
    assert pair_groups(2, 3) == [[0, 2], [1, 3], [4]]
    assert pair_groups(3, 1) == [[0, 3], [1, 2]]


def test_projection_head_gives_unit_256_vectors():
    head = ProjectionHead(12)
    out = head(torch.randn(2, 12, 5, 7))
    assert out.shape == (2, 256, 5, 7)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 5, 7))
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(weight=-0.1), "--pixl-weight"),
        (dict(weight=float("nan")), "--pixl-weight"),
        (dict(tau=0.0), "--pixl-tau"),
        (dict(eta="0.2"), "--pixl-eta"),
        (dict(eta="0.2,1.5"), "--pixl-eta"),
        (dict(eta="0.2,x"), "--pixl-eta"),
        (dict(scales="1,0"), "--pixl-scales"),
        (dict(scales=""), "--pixl-scales"),
        (dict(scale_rule="max"), "--pixl-scale-rule"),
    ],
)
def test_bad_options_name_the_option(kwargs: dict, option: str):
    with pytest.raises(PixlError, match=option) as err:
        PixlExtension(**kwargs)
    assert "\n" not in str(err.value)


def test_linear_probe_mode_is_refused():
    with pytest.raises(PixlError, match="--mode lp"):
        PixlExtension.check_mode("lp")
    ext = PixlExtension()
    with pytest.raises(PixlError, match="--pixel-loss pixl"):
        ext.setup(fake_context(TinySegmentor(), mode="lp"))


# --- a fake fine-tuning loop ----------------------------------------------------------------------


def _ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX)


ITERS = 6


def build_run(data: Path, out: Path, kinds: tuple[str, ...], pixl_weight: float = 0.1):
    """Model, extensions and optimizer as the loop would build them (fresh every time: for resume)."""
    train_set = SegDataset(data, "folder", "train", transform=TrainAugment.for_crop(16), seed=0)
    semi_data = prepare_semi(train_set, "1/2", seed=0, out=out, min_labelled=2)
    torch.manual_seed(0)
    model = TinySegmentor(num_classes=train_set.num_classes).train()
    exts = []
    semi = None
    if "semi" in kinds:
        semi = MeanTeacherExtension(semi_data.files, semi_data.split, workers=0)
        exts.append(semi)
    if "pixl" in kinds:
        exts.append(
            PixlExtension(weight=pixl_weight, pseudo_labels=semi.confident_pseudo_labels if semi else None)
        )
    ctx = fake_context(model, ITERS, out=out, train_set=semi_data.train_set)
    for e in exts:
        e.setup(ctx)
    params = list(model.parameters()) + [p for e in exts for m in e.modules() for p in m.parameters()]
    return SimpleNamespace(
        model=model, exts=exts, semi=semi, train=semi_data.train_set, opt=torch.optim.AdamW(params, lr=1e-2)
    )


def fake_step(run, it: int, check_ema: bool = False) -> dict[str, float]:
    """One iteration in the order of the real loop: extra images, one forward, loss terms, step, after_step."""
    n = len(run.train)
    pairs = [run.train[(2 * it + j) % n] for j in range(2)]
    img, label = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    extras = [x for e in run.exts if (x := e.extra_images(it)) is not None]
    b = img.shape[0]
    res = run.model(torch.cat([img, *extras]), features=any(e.needs_features for e in run.exts))
    feats = res.features
    out = SegOutput(res.logits[:b], res.aux[:b], feats[:b] if feats is not None else None)
    extra = SegOutput(res.logits[b:], None, feats[b:] if feats is not None else None) if extras else None
    loss = _ce(out.logits, label) + 0.4 * _ce(out.aux, label)
    terms = {}
    for e in run.exts:
        terms.update(e.loss_terms(it, label, out, extra))
    total = loss + sum(terms.values())
    run.opt.zero_grad(set_to_none=True)
    total.backward()
    run.opt.step()
    if check_ema and run.semi is not None:
        before = {k: v.clone() for k, v in run.semi.teacher.state_dict().items()}
    for e in run.exts:
        e.after_step(it)
    if check_ema and run.semi is not None:
        alpha = ema_alpha(it)
        student = run.model.state_dict()
        for k, t in run.semi.teacher.state_dict().items():
            if t.is_floating_point():
                torch.testing.assert_close(
                    t, alpha * before[k] + (1 - alpha) * student[k], rtol=1e-6, atol=1e-7
                )
                if it == 0:
                    assert torch.equal(t, student[k])  # alpha_0 = 0: the teacher starts as the student
            else:
                assert torch.equal(t, student[k])
    return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("pixl") / "data", "folder", n_train=8, n_test=2, size=24, seed=0)


@pytest.mark.parametrize("kinds", [("semi", "pixl"), ("pixl",), ("semi",)])
def test_fake_loop_runs_with_finite_terms_and_ema(tmp_path: Path, tiny_data: Path, kinds):
    run = build_run(tiny_data, tmp_path, kinds)
    teacher0 = {k: v.clone() for k, v in run.semi.teacher.state_dict().items()} if run.semi else None
    for it in range(ITERS):
        logged = fake_step(run, it, check_ema=True)
        expected = (
            {"loss"} | ({"semi_ce"} if "semi" in kinds else set()) | ({"pixl"} if "pixl" in kinds else set())
        )
        assert set(logged) == expected  # every term is reported under its name
        assert all(math.isfinite(v) for v in logged.values())
    if run.semi is not None:
        moved = [k for k, v in run.semi.teacher.state_dict().items() if not torch.equal(v, teacher0[k])]
        assert moved  # the teacher followed the student
        assert (tmp_path / "labelled.txt").read_text().split() == run.semi.split.labelled


def test_fake_loop_resume_mid_run_is_bit_identical(tmp_path: Path, tiny_data: Path):
    kinds = ("semi", "pixl")
    straight = build_run(tiny_data, tmp_path / "a", kinds)
    for it in range(ITERS):
        fake_step(straight, it)

    first = build_run(tiny_data, tmp_path / "b", kinds)
    for it in range(3):  # 4 unlabelled images, 2 per batch: iteration 3 is mid-epoch of the stream
        fake_step(first, it)
    ckpt = tmp_path / "b" / "checkpoint.pt"
    state = {"model": first.model.state_dict(), "optimizer": first.opt.state_dict(), "iter": 3}
    state["extensions"] = {e.name: e.state_dict() for e in first.exts}
    save_checkpoint(ckpt, state)
    del first

    resumed = build_run(tiny_data, tmp_path / "b", kinds)
    saved = load_checkpoint(ckpt)  # weights_only: the extension states are plain tensors and lists
    resumed.model.load_state_dict(saved["model"])
    resumed.opt.load_state_dict(saved["optimizer"])
    for e in resumed.exts:
        e.load_state_dict(saved["extensions"][e.name])
    for it in range(saved["iter"], ITERS):
        fake_step(resumed, it)

    for a, b in [
        (straight.model, resumed.model),
        (straight.semi.teacher, resumed.semi.teacher),
        (straight.exts[1].head, resumed.exts[1].head),
    ]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weight_zero_contributes_exactly_nothing(tiny_data: Path, tmp_path: Path):
    """The gradients of CE + (PiXL at weight 0) equal those of CE alone, bit for bit, and setting PiXL
    up draws nothing from the global RNG."""
    torch.manual_seed(0)
    model = TinySegmentor(num_classes=5).train()
    ext = PixlExtension(weight=0.0)
    state = torch.get_rng_state()
    ext.setup(fake_context(model))
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 16, 16, generator=g)
    label = torch.randint(0, 5, (2, 16, 16), generator=g)

    def grads(with_pixl: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        res = model(img, features=True)
        loss = _ce(res.logits, label) + 0.4 * _ce(res.aux, label)
        if with_pixl:
            term = ext.loss_terms(0, label, res, None)["pixl"]
            assert term.item() == 0.0 or ext.weight > 0
            loss = loss + term
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, with_zero = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_zero))
    ext.weight = 0.1  # the same call with a weight does move the features' gradients
    assert any(not torch.equal(a, b) for a, b in zip(plain, grads(True)))


def test_extra_images_need_pseudo_labels_and_features(monkeypatch):
    ext = PixlExtension(feature_dim=4)
    ext.setup(fake_context(TinySegmentor(dim=4)))
    emb, probs, labels = random_case(2, d=4, c=3)
    out = SegOutput(torch.log(probs), None, emb)
    with pytest.raises(RuntimeError, match="no pseudo-labels"):
        ext.loss_terms(0, labels, out, out)
    with pytest.raises(RuntimeError, match="features=True"):
        ext.loss_terms(0, labels, SegOutput(out.logits, None, None), None)
    # With pseudo-labels, the extra images take part with those classes, each paired with a labelled one.
    seen = []
    real = pixl_mod.pixl_loss
    monkeypatch.setattr(pixl_mod, "pixl_loss", lambda *a, **k: seen.append(a) or real(*a, **k))
    pseudo = torch.where(labels == IGNORE_INDEX, labels, (labels + 1) % 3)
    ext.pseudo_labels = lambda: pseudo
    assert torch.isfinite(ext.loss_terms(0, labels, out, out)["pixl"])
    grid_labels, groups = seen[0][2], seen[0][4]
    assert torch.equal(grid_labels[0], torch.cat([labels, pseudo])) and groups == [[0, 2], [1, 3]]
    assert torch.equal(grid_labels[1][2:], pixl_mod.labels_to_grid(pseudo, grid_labels[1].shape[-2:]))
