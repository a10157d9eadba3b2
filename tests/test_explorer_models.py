"""One explorer for several models: the same images for every model within one budget for the
report, models of different input sizes side by side, and unip-analyze holding one model on the
device at a time."""

from __future__ import annotations

import gc
import json
import re
import weakref

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, TINY_IMG, write_images
from test_explorer import backbone

from unip_analysis import analyze, checkpoints, explorer, explorer_widget

# ViT-L/16 and ViT-B/16 at 224 px, shrunk: twice the depth, twice the heads (the real pair: 2x, 4/3x)
L_LIKE = "vit_tiny_patch16_224(depth=8,embed_dim=128,num_heads=4,patch_size=8)"
B_LIKE = TINY_ARCH


def test_large_and_base_models_keep_the_same_images(tmp_path, monkeypatch):
    """A budget where one model's own share would keep fewer images than the other's (what the
    per-model budget did: ViT-L + ViT-B kept 1 and 4): both keep all 4, the larger one gives up
    precision or queries instead, and the page says so."""
    monkeypatch.setattr(explorer, "BUDGET_BYTES", 60_000)
    images = write_images(tmp_path / "imgs", n=5)
    w = explorer_widget.explore(
        {"L": backbone(L_LIKE, TINY_IMG), "B": backbone(B_LIKE, TINY_IMG, seed=1)},
        images,
        explore_images=4,
        widget=False,
    )
    models = {m["name"]: m for m in w.meta["models"]}
    assert [len(models[n]["images"]) for n in ("L", "B")] == [4, 4]
    assert [im["label"] for im in models["L"]["images"]] == [im["label"] for im in models["B"]["images"]]
    for i in range(4):  # the very same pixels
        np.testing.assert_array_equal(w.analyses["L"].explorer.images[i], w.analyses["B"].explorer.images[i])
    assert w.meta["bytes"] <= 60_000 and w.meta["budget"] == 60_000
    qk = {m["qk"]["blob"] for m in w.meta["models"]}  # the query-key view: its own 2 MB per model
    assert sum(len(t) for k, t in w.blobs.items() if k not in qk) <= 60_000
    assert all(len(w.blobs[k]) <= explorer.QK_BUDGET_BYTES for k in qk)
    large = w.analyses["L"].explorer
    assert large.query_stride > 1 or large.encoding != "rows-u8"
    assert models["L"]["reductions"] and any(
        "60 MB" not in r and "budget" in r for r in models["L"]["reductions"]
    )


def test_explore_takes_models_of_different_input_sizes(tmp_path):
    """Each model at its own input size (its own grid) on the same images, not timm's AssertionError."""
    images = write_images(tmp_path / "imgs", n=3)
    small = backbone(TINY_ARCH, TINY_IMG)  # 32 px: 4 x 4 patches
    large = backbone(TINY_ARCH, 48, seed=2)  # 48 px: 6 x 6 patches
    w = explorer_widget.explore({"s": small, "l": large}, images, explore_images=2, widget=False)
    assert w.analyses["s"].grid == (4, 4) and w.analyses["l"].grid == (6, 6)
    assert [m["grid"] for m in w.meta["models"]] == [[4, 4], [6, 6]]
    assert w.analyses["s"].explorer.labels == w.analyses["l"].explorer.labels
    w.set(query=(3, 3), layer=2, head="mean", image=1)
    rows = w.displayed_rows()
    assert rows["s"].shape == (16,) and rows["l"].shape == (36,)
    with torch.no_grad():  # the large model's row at the same place: patch (5, 5) of 6 x 6
        x = analyze.image_dataset(images, 48)[1][None]
        from unip_analysis import attention

        true = attention.layer_qk_logits(large.model, x, 1).double().softmax(-1)[0, :, 1 + 35, 1:].mean(0)
    np.testing.assert_allclose(rows["l"], true.numpy(), rtol=0, atol=float(true.max()) / 100)
    # a dataset at one size for a model of another: one clear line
    with pytest.raises(ValueError, match="takes 48x48"):
        explorer_widget.explore({"l": large}, analyze.image_dataset(images, TINY_IMG), widget=False)


def test_cli_explore_budget_same_images_and_stated(tiny_timm_checkpoint, image_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from unip_analysis import cli

    arch, path = tiny_timm_checkpoint
    large = checkpoints.build_vit(L_LIKE, img_size=TINY_IMG)
    large_path = tmp_path / "large.safetensors"
    save_file({k: v.contiguous() for k, v in large.state_dict().items()}, str(large_path))
    argv = [
        "--checkpoint", f"b=timm:{arch}:{path}",
        "--checkpoint", f"l=timm:{L_LIKE}:{large_path}",
        "--images", str(image_dir), "--img-size", str(TINY_IMG),
        "--no-progress", "--bootstrap", "20", "--explore-images", "3", "--explore-budget", "0.05",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    meta = json.loads(re.search(r'class="ux-meta">(.*?)</script>', page, re.S).group(1))
    assert [len(m["images"]) for m in meta["models"]] == [3, 3] and meta["budget"] == 50_000
    assert meta["bytes"] <= 50_000
    out = capsys.readouterr().out
    assert "explorer b: " in out and "explorer l: " in out and "of its maximum (measured)" in out
    assert cli.main([*argv[:-1], str(tmp_path / "bad"), "--explore-budget", "0"]) == 2
    assert "--explore-budget" in capsys.readouterr().err


def test_unip_analyze_holds_one_model_on_the_device_at_a_time(
    tiny_timm_checkpoint, image_dir, tmp_path, monkeypatch
):
    """Each model goes to the device for its own analysis only: loaded on the CPU, dropped after.
    (A pretend device: where each live model was last sent is recorded, nothing moves.)"""
    from unip_analysis import cli

    arch, path = tiny_timm_checkpoint
    where: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    inside = []
    seen = []

    def pretend_to(model, device=None, *a, **k):
        if not inside and device is not None:
            where[model] = str(device)
        return torch.nn.Module.to(model, "cpu")

    real_load, real_analyze = checkpoints.load_backbone, analyze.analyze_backbone

    def load(family, arch, path, img_size=None, device="cpu", **kw):
        bb = real_load(family, arch, path, img_size=img_size, device="cpu", **kw)
        bb.model.to = pretend_to.__get__(bb.model)
        bb.model.to(device)
        return bb

    def analyse(bb, dataset, name="model", device="cpu", **kw):
        gc.collect()
        bb.model.to(device)  # what the analysis does first
        seen.append({id(m): d for m, d in where.items() if d != "cpu"})
        inside.append(True)
        try:
            return real_analyze(bb, dataset, name=name, device="cpu", **kw)
        finally:
            inside.pop()

    monkeypatch.setattr(cli, "resolve_device", lambda device: "cuda:7")
    monkeypatch.setattr(checkpoints, "load_backbone", load)
    monkeypatch.setattr(analyze, "analyze_backbone", analyse)
    argv = [
        "--checkpoint", f"a=timm:{arch}:{path}", "--checkpoint", f"b=timm:{arch}:{path}",
        "--checkpoint", f"c=timm:{arch}:{path}",
        "--images", str(image_dir), "--img-size", str(TINY_IMG), "--no-progress", "--bootstrap", "20",
        "--explore-images", "0", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert len(seen) == 3
    assert all(len(on_device) == 1 for on_device in seen), seen  # the one being analysed, no other
