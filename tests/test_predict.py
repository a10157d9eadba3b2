"""unip-predict and unip-export on a tiny fine-tuned run: the same mIoU as unip-finetune's evaluation,
masks read back with PIL, resume, failures, refused inputs, ONNX export of UperNet and linear-probe
models, and the pictures of a run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_finetune_run
from PIL import Image

from unip_train.export.cli import main as export_main
from unip_train.export.onnx import export_onnx
from unip_train.finetune.config import FinetuneConfig, resolve
from unip_train.finetune.model_file import build_backbone, build_segmentor, save_model
from unip_train.finetune.pictures import RUN_PICTURES
from unip_train.finetune.trainer import evaluate_saved
from unip_train.predict.cli import main
from unip_train.predict.inference import ModelInfo, PredictError, open_model, sidecar_path


def with_palette(model_pt: Path, dest: Path, palette) -> Path:
    """A copy of ``model.pt`` with ``palette`` (None: without one, as files from before palettes)."""
    ckpt = torch.load(model_pt, weights_only=True)
    ckpt.pop("palette", None)
    if palette is not None:
        ckpt["palette"] = list(palette)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 10-iteration LL-FPN + UperNet run on a synthetic SODA layout (48 x 64 images: resized to
    32 x 43, two 32-pixel windows each)."""
    root = tmp_path_factory.mktemp("predict")
    data, cfg, metrics = tiny_finetune_run(root, n_train=8, n_test=5, batch_size=4, iters=10)
    model = root / "run" / "model.pt"
    palette = [v for rgb in torch.load(model, weights_only=True)["palette"] for v in rgb]
    return {
        "data": data,
        "run": root / "run",
        "model": model,
        "metrics": metrics,
        "cfg": cfg,
        "palette": palette,
    }


def read(path: Path) -> np.ndarray:
    """An image file's values as stored (a P-mode mask: its class ids)."""
    with Image.open(path) as im:
        return np.asarray(im)


def predict(*argv, workers: int = 0) -> int:
    return main([*map(str, argv), "--no-progress", "--workers", str(workers)])


def test_predict_gives_unip_finetune_miou_exactly(trained, tmp_path: Path, capsys):
    out = tmp_path / "pred"
    assert (
        predict(
            "--model",
            trained["model"].parent,
            "--data-root",
            trained["data"],
            "--out",
            out,
            "--batch-size",
            3,
        )
        == 0
    )
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((trained["run"] / "metrics.json").read_text())
    assert got["miou"] == want["miou"] and got["pixel_acc"] == want["pixel_acc"]
    assert got["per_class_iou"] == want["per_class_iou"] and got["num_images"] == want["num_images"] == 5
    conf = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 22))
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("image,labelled_pixels,wrong_pixels")
    assert conf.sum() == sum(int(r.split(",")[1]) for r in rows[1:])
    assert "mIoU" in capsys.readouterr().out
    # Every image gets a mask, an overlay and an error panel; the confusion matrix a picture.
    for folder, suffix in (("pred", ".png"), ("overlay", ".jpg"), ("errors", ".png")):
        assert len(list((out / folder).glob(f"*{suffix}"))) == 5
    assert read(out / "confusion_matrix.png").shape[1] > 300
    with Image.open(next((out / "errors").glob("*.png"))) as panel:
        assert panel.size[0] > 4 * 64  # image | ground truth | prediction | wrong pixels


def test_masks_read_back_with_pil(trained, tmp_path: Path):
    images = tmp_path / "images"
    (images / "night").mkdir(parents=True)
    src = sorted((trained["data"] / "JPEGImages").glob("*.jpg"))
    shutil.copy(src[0], images / "a.jpg")
    # A 16-bit PNG in a sub-folder: read as training reads it (scaled by 65535), mirrored in the outputs.
    grey = read(src[1]).astype(np.uint16) * 257
    Image.fromarray(grey).save(images / "night" / "b.png")
    out = tmp_path / "out"
    assert (
        predict("--model", trained["model"], "--images", images, "--out", out, "--save-probs", workers=1) == 0
    )
    for rel in ("a", "night/b"):
        with Image.open(out / "pred" / f"{rel}.png") as im:
            assert im.mode == "P" and im.size == (64, 48)
            assert im.getpalette()[: 3 * 21] == trained["palette"] and len(trained["palette"]) == 63
            mask = np.asarray(im)
        assert mask.max() < 21
        probs = np.load(out / "prob" / f"{rel}.npy")
        assert probs.dtype == np.float16 and probs.shape == (21, 48, 64)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)
        assert (probs.argmax(0) == mask).mean() > 0.99  # float16 may tie the top two
        with Image.open(out / "overlay" / f"{rel}.jpg") as ov:
            assert ov.format == "JPEG" and ov.size == (64, 48) and ov.mode == "RGB"
    # The same image as 8-bit JPEG and 16-bit PNG (x 257 = the same 0-1 values): the same mask.
    ref = tmp_path / "ref"
    shutil.copy(src[1], images / "c.jpg")
    assert predict("--model", trained["model"], "--images", images / "c.jpg", "--out", ref) == 0
    assert np.array_equal(
        read(ref / "pred" / "c.png"),
        read(out / "pred" / "night" / "b.png"),
    )
    assert not (out / "failed.txt").exists() and not (out / "metrics.json").exists()


def test_rerun_skips_done_images_and_finishes_a_killed_run(trained, tmp_path: Path, capsys):
    images = trained["data"] / "JPEGImages"
    labels = trained["data"] / "SegmentationClassPNG"
    out = tmp_path / "out"
    assert predict("--model", trained["model"], "--images", images, "--labels", labels, "--out", out) == 0
    first = json.loads((out / "metrics.json").read_text())
    done = sorted((out / "pred").glob("*.png"))
    n = len(done)
    # A run killed while writing one image: its mask never renamed into place, a temp file left over.
    (out / "pred" / done[0].name).unlink()
    (out / "pred" / f".{done[0].name}.abc.tmp").write_bytes(b"half")
    stamps = {p: p.stat().st_mtime_ns for p in done[1:]}
    capsys.readouterr()
    assert predict("--model", trained["model"], "--images", images, "--labels", labels, "--out", out) == 0
    assert f"1 segmented, {n - 1} already done" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # not written again
    again = json.loads((out / "metrics.json").read_text())
    assert again["miou"] == first["miou"] and again["num_images"] == n  # skipped images still scored


def test_unreadable_and_too_small_images_fail_alone(trained, tmp_path: Path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((trained["data"] / "JPEGImages").glob("*.jpg")), images / "good.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((4, 40), dtype=np.uint8)).save(images / "tiny.png")  # 4 < the 8-pixel patch
    out = tmp_path / "out"
    assert predict("--model", trained["model"], "--images", images, "--out", out) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "(skipped)" in ln]
    assert len(lines) == 2 and any("broken.png" in ln and "cannot decode" in ln for ln in lines)
    assert any("tiny.png" in ln and "smaller than one 8x8 patch" in ln for ln in lines)
    failed = (out / "failed.txt").read_text().splitlines()
    assert sorted(Path(ln.split("\t")[0]).name for ln in failed) == ["broken.png", "tiny.png"]
    assert (out / "pred" / "good.png").is_file()
    # Fixed input: the next run segments nothing again, fails nothing, and drops failed.txt.
    (images / "broken.png").unlink()
    (images / "tiny.png").unlink()
    assert predict("--model", trained["model"], "--images", images, "--out", out) == 0
    assert not (out / "failed.txt").exists()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unip-predict: error: ")
    return err[0]


def test_refused_inputs_get_one_line(trained, tmp_path: Path, capsys):
    images = trained["data"] / "JPEGImages"
    out = tmp_path / "out"
    no_palette = with_palette(trained["model"], tmp_path / "np" / "model.pt", None)
    assert predict("--model", no_palette, "--images", images, "--out", out) == 2
    assert "no palette" in one_line_error(capsys) and not out.exists()
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert predict("--model", foreign, "--images", images, "--out", out) == 2
    assert "not a model.pt of this unip-finetune" in one_line_error(capsys)
    labels = tmp_path / "labels"
    shutil.copytree(trained["data"] / "SegmentationClassPNG", labels)
    missing = sorted(labels.glob("*.png"))[0]
    missing.unlink()
    assert predict("--model", trained["model"], "--images", images, "--labels", labels, "--out", out) == 2
    assert f"no label map for 1 of {len(list(images.glob('*.jpg')))} images" in one_line_error(capsys)
    shutil.copy(sorted(labels.glob("*.png"))[0], missing)
    bad = read(missing).copy()
    bad[0, 0] = 40  # SODA has 21 classes
    Image.fromarray(bad).save(missing)
    assert predict("--model", trained["model"], "--images", images, "--labels", labels, "--out", out) == 2
    line = one_line_error(capsys)
    assert missing.name in line and "label values [40]" in line


def test_onnx_export_of_upernet_matches_pytorch_and_predicts_alike(trained, tmp_path: Path, capsys):
    onnx_path = tmp_path / "soda.onnx"
    assert export_main(["--model", str(trained["model"].parent), "--out", str(onnx_path)]) == 0
    said = capsys.readouterr().out
    assert "opset 18" in said and "max abs logit difference" in said
    side = json.loads(sidecar_path(onnx_path).read_text())
    assert side["check"]["max_abs_diff"] <= 1e-3 and side["check"]["argmax_agreement"] > 0.999
    assert side["classes"][1] == "person" and side["palette"][1] == trained["palette"][3:6]
    assert side["window"] == 32 and side["stride"] == 21 and side["channels"] == 1
    assert side["norm"] == "infrared" and side["mean"] == [pytest.approx(96.9255 / 255)] * 3
    info = ModelInfo.from_sidecar(sidecar_path(onnx_path))
    assert info == open_model(trained["model"], device="cpu").info  # everything the torch path uses
    out_t, out_o = tmp_path / "t", tmp_path / "o"
    assert predict("--model", trained["model"], "--data-root", trained["data"], "--out", out_t) == 0
    assert (
        predict("--backend", "onnx", "--model", onnx_path, "--data-root", trained["data"], "--out", out_o)
        == 0
    )
    agree = [
        (read(p) == read(out_o / "pred" / p.name)).mean() for p in sorted((out_t / "pred").glob("*.png"))
    ]
    assert len(agree) == 5 and min(agree) > 0.999
    m_t, m_o = (json.loads((o / "metrics.json").read_text())["miou"] for o in (out_t, out_o))
    assert abs(m_t - m_o) < 1e-3
    # Above the tolerance the graph is refused and nothing is written.
    with pytest.raises(PredictError, match="differ from PyTorch's by up to"):
        export_onnx(trained["model"], tmp_path / "x.onnx", tolerance=-1.0)
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob(".x.onnx*"))


def test_onnx_export_of_a_linear_probe(trained, tmp_path: Path):
    cfg = resolve(
        FinetuneConfig(**{**trained["cfg"].__dict__, "mode": "lp", "layers": [2, 4], "out": str(tmp_path)})
    )
    backbone, info = build_backbone(cfg)
    torch.manual_seed(1)
    model = build_segmentor(cfg, backbone, 21)
    torch.nn.init.normal_(model.decode_head.classifier.weight, std=0.5)  # logits far from ties
    path = tmp_path / "lp" / "model.pt"
    save_model(
        path, model, cfg, [f"c{i}" for i in range(21)], info, [[i, 2 * i, 3 * i] for i in range(21)], 1
    )
    report = export_onnx(path, tmp_path / "lp.onnx", images=str(trained["data"] / "JPEGImages"))
    print(
        f"\nlinear probe: max |ORT - PyTorch| {report['max_abs_diff']:.2e}, argmax agreement {report['argmax_agreement']}"
    )
    assert report["max_abs_diff"] <= 1e-3 and report["argmax_agreement"] > 0.999
    assert json.loads(sidecar_path(tmp_path / "lp.onnx").read_text())["classes"][3] == "c3"


def test_run_folder_pictures(trained, tmp_path: Path):
    for name in RUN_PICTURES:
        with Image.open(trained["run"] / name) as im:
            assert im.format == "PNG" and im.size[0] > 200, name
    csv = (trained["run"] / "confusion_matrix.csv").read_text().splitlines()
    assert len(csv) == 22 and csv[0].split(",")[1:3] == ["background", "person"]
    # --eval-only writes them too, beside its metrics.json.
    metrics = evaluate_saved(trained["model"], out=tmp_path / "re", device="cpu", progress=False)
    assert metrics["miou"] == trained["metrics"]["miou"]
    assert all((tmp_path / "re" / name).is_file() for name in ("confusion_matrix.png", "samples.png"))
