"""unip-predict's output folder belongs to one run: another model into it is refused (not "already
done" under the wrong name), --out inside --images or a fine-tuning run folder is refused, --overwrite
moves only the predictions, and symlinked images are followed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_finetune_run

from unip_analysis.output_folder import RECORD
from unip_train.predict.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A 6-iteration fine-tuning run (model A) and model B: A's weights shifted, other masks."""
    root = tmp_path_factory.mktemp("predict_out")
    data, _, _ = tiny_finetune_run(root, n_train=6, n_test=3, batch_size=3, iters=6)
    a = root / "run" / "model.pt"
    state = torch.load(a, weights_only=True)
    g = torch.Generator().manual_seed(1)
    state["state_dict"] = {
        k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in state["state_dict"].items()
    }
    b = root / "b" / "model.pt"
    b.parent.mkdir()
    torch.save(state, b)
    return {"data": data, "run": root / "run", "a": a, "b": b}


def predict(*argv) -> int:
    return main([*map(str, argv), "--no-progress", "--workers", "0"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unip-predict: error: "), err
    return err[0]


def test_model_b_into_model_a_folder_is_refused_then_replaced(models, tmp_path, capsys):
    images = models["data"] / "JPEGImages"
    labels = models["data"] / "SegmentationClassPNG"
    args = ["--images", images, "--labels", labels]
    assert predict("--model", models["b"], *args, "--out", tmp_path / "b_alone") == 0
    b_alone = json.loads((tmp_path / "b_alone" / "metrics.json").read_text())
    p = tmp_path / "p"
    assert predict("--model", models["a"], *args, "--out", p) == 0
    a_metrics = (p / "metrics.json").read_text()
    n = len(list((p / "pred").rglob("*.png")))
    capsys.readouterr()
    assert predict("--model", models["b"], *args, "--out", p) == 2
    line = one_line_error(capsys)
    assert "holds predictions made with other settings (the model / checkpoint files" in line
    assert "--overwrite" in line
    assert (p / "metrics.json").read_text() == a_metrics  # A's results untouched, not renamed B's
    # The same run again continues: every image already done.
    assert predict("--model", models["a"], *args, "--out", p) == 0
    assert f"0 segmented, {n} already done" in capsys.readouterr().out
    # Other options are another run too.
    assert predict("--model", models["a"], *args, "--out", p, "--opacity", "0.8") == 2
    assert "opacity: 0.5 -> 0.8" in one_line_error(capsys)
    assert predict("--model", models["b"], *args, "--out", p, "--overwrite") == 0
    assert f"{n} segmented, 0 already done" in capsys.readouterr().out
    b_there = json.loads((p / "metrics.json").read_text())
    assert b_there["miou"] == b_alone["miou"]
    (aside,) = p.glob("previous-*")
    assert (aside / "metrics.json").read_text() == a_metrics and (aside / "pred").is_dir()
    rec = json.loads((p / RECORD).read_text())
    assert rec["command"] == "unip-predict" and str(models["b"].resolve()) in json.dumps(rec["identity"])


def test_out_inside_images_is_refused(models, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(models["data"] / "JPEGImages", images)
    before = sorted(images.rglob("*"))
    assert predict("--model", models["a"], "--images", images, "--out", images / "preds") == 2
    assert "lies inside the input folder" in one_line_error(capsys)
    assert predict("--model", models["a"], "--images", f"{images}/**/*.jpg", "--out", images / "preds") == 2
    assert "lies inside the input folder" in one_line_error(capsys)
    assert sorted(images.rglob("*")) == before


def test_out_a_fine_tuning_run_folder_is_refused(models, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(models["run"], run_dir)
    metrics = (run_dir / "metrics.json").read_text()
    images = models["data"] / "JPEGImages"
    assert json.loads((run_dir / RECORD).read_text())["command"] == "unip-finetune"
    assert predict("--model", run_dir / "model.pt", "--images", images, "--out", run_dir) == 2
    assert "holds a unip-finetune run" in one_line_error(capsys)
    assert predict("--model", run_dir, "--images", images, "--out", run_dir, "--overwrite") == 2
    assert "is the input folder" in one_line_error(capsys)
    (run_dir / RECORD).unlink()  # a run from before run records
    assert predict("--model", run_dir / "model.pt", "--images", images, "--out", run_dir) == 2
    assert "metrics.json not written by unip-predict" in one_line_error(capsys)
    assert (run_dir / "metrics.json").read_text() == metrics and not (run_dir / "pred").exists()


def test_overwrite_with_images_inside_out_leaves_them(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "work"
    images = out / "frames"
    shutil.copytree(models["data"] / "JPEGImages", images)
    model = out / "model.pt"
    shutil.copy(models["a"], model)
    before = sorted(images.rglob("*"))
    assert predict("--model", model, "--images", images, "--out", out) == 0
    assert predict("--model", model, "--images", images, "--out", out, "--overwrite") == 0
    assert sorted(images.rglob("*")) == before and model.is_file()
    (aside,) = out.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["overlay", "pred", RECORD]

    monkeypatch.chdir(out)  # --out . with --overwrite: refused
    assert predict("--model", model, "--images", images, "--out", ".", "--overwrite") == 2
    assert "is the working directory" in one_line_error(capsys)


def test_symlinked_images_are_followed_and_broken_links_named(models, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(models["data"] / "JPEGImages", elsewhere)
    first, second = sorted(elsewhere.glob("*.jpg"))[:2]
    (images / "linked.jpg").symlink_to(first)
    (images / "sub").symlink_to(elsewhere, target_is_directory=True)
    shutil.copy(second, images / "plain.jpg")
    out = tmp_path / "out"
    assert predict("--model", models["a"], "--images", images, "--out", out) == 0, capsys.readouterr().err
    preds = sorted(p.relative_to(out / "pred").as_posix() for p in (out / "pred").rglob("*.png"))
    assert "linked.png" in preds and "plain.png" in preds and f"sub/{first.stem}.png" in preds
    (images / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    assert predict("--model", models["a"], "--images", images, "--out", tmp_path / "out2") == 2
    line = one_line_error(capsys)
    assert "gone.jpg" in line and "broken" in line
