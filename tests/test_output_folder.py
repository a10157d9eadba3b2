"""An output folder belongs to one run (unip_analysis.output_folder): run.json records what made it;
another run, another command or an input folder is refused; --overwrite moves only the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_IMG

from unip_analysis import cli, output_folder, selection
from unip_analysis.errors import SpecError
from unip_analysis.output_folder import RECORD, Run, check, open_out


def toy(identity=None, inputs=(), command="unip-toy", outputs=("metrics.json", "log.jsonl")) -> Run:
    return Run(command, identity or {"lr": 0.1}, outputs, inputs, what="a toy run")


def test_record_lists_the_files_before_they_are_written(tmp_path):
    out = tmp_path / "run"
    folder = open_out(out, toy())
    rec = json.loads((out / RECORD).read_text())
    assert rec["command"] == "unip-toy" and rec["identity"] == {"lr": 0.1}
    assert rec["files"] == ["log.jsonl", "metrics.json"] and rec["version"]
    assert not (out / "metrics.json").exists()  # listed, not yet written
    folder.claim("extra.csv")
    assert "extra.csv" in json.loads((out / RECORD).read_text())["files"]


def test_same_run_continues_another_is_refused(tmp_path):
    out = tmp_path / "run"
    open_out(out, toy())
    (out / "metrics.json").write_text("{}")
    assert check(out, toy(), resume=True).state == "continue"
    with pytest.raises(SpecError, match=r"already holds a toy run; pass --resume"):
        check(out, toy())
    with pytest.raises(SpecError, match=r"other settings \(lr: 0.1 -> 0.2\); pass --overwrite"):
        check(out, toy({"lr": 0.2}), resume=True)
    with pytest.raises(SpecError, match=r"holds a unip-toy run \(run.json\); unip-other does not write"):
        check(out, toy(command="unip-other"), overwrite=True)  # not even with --overwrite
    with pytest.raises(SpecError, match="--resume and --overwrite together"):
        check(out, toy(), resume=True, overwrite=True)


def test_overwrite_moves_only_the_recorded_files_never_inputs(tmp_path):
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / "images" / "a.png").write_bytes(b"x")
    (out / "teacher.pt").write_bytes(b"w")
    inputs = [out / "images", out / "teacher.pt"]
    open_out(out, toy(inputs=inputs))
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # the user's, not the run's
    folder = open_out(out, toy({"lr": 0.2}, inputs=inputs), overwrite=True)
    aside = folder.aside
    assert aside is not None and sorted(p.name for p in aside.iterdir()) == ["metrics.json", RECORD]
    assert (
        (out / "images" / "a.png").exists() and (out / "teacher.pt").exists() and (out / "notes.txt").exists()
    )
    assert json.loads((out / RECORD).read_text())["identity"] == {"lr": 0.2}


def test_overwrite_refuses_a_run_file_that_holds_an_input(tmp_path):
    out = tmp_path / "run"
    open_out(out, toy(outputs=("figures",)))
    (out / "figures").mkdir()
    (out / "figures" / "teacher.pt").write_bytes(b"w")
    with pytest.raises(SpecError, match=r"figures holds the input .*teacher.pt: --overwrite would move it"):
        check(
            out,
            toy({"lr": 0.2}, inputs=[out / "figures" / "teacher.pt"], outputs=("figures",)),
            overwrite=True,
        )


def test_out_in_an_input_folder_the_working_directory_or_home_is_refused(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(SpecError, match="lies inside the input folder"):
        check(images / "preds", toy(inputs=[images]))
    with pytest.raises(SpecError, match="is the input folder"):
        check(images, toy(inputs=[images]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"--out \. is the working directory: --overwrite would move"):
        check(Path("."), toy(), overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(SpecError, match="is your home folder"):
        check(tmp_path / "home", toy(), overwrite=True)


def test_older_folders_without_a_record(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "log.jsonl").write_text("x\n")
    (out / "image.png").write_bytes(b"i")
    legacy = toy(inputs=[out / "image.png"])
    with pytest.raises(SpecError, match=r"already holds a toy run \(log.jsonl, metrics.json\)"):
        check(out, legacy)
    assert check(out, legacy, resume=True).state == "continue"
    with pytest.raises(SpecError, match="from before run records"):
        check(out, legacy, resume=True, continue_legacy=False)
    folder = open_out(out, legacy, overwrite=True)
    assert sorted(p.name for p in folder.aside.iterdir()) == ["log.jsonl", "metrics.json"]
    assert (out / "image.png").exists()
    # Another command's file where this one writes, and no record: refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    with pytest.raises(SpecError, match=r"holds metrics.json not written by unip-toy"):
        check(other, Run("unip-toy", {}, ("pred", "metrics.json"), markers=("pred",)))


def test_identity_digests_the_model_files(tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"a" * 10)
    a = output_folder.identity({"lr": 1, "out": "x", "progress": True}, digests=[w])
    assert set(a) == {"lr", "digests"} and a["digests"][str(w)].startswith("sha256:")
    w.write_bytes(b"b" * 10)
    assert output_folder.identity({"lr": 1}, digests=[w]) != a
    rel = output_folder.identity({"images": "imgs"}, paths=["images"])
    assert rel["images"] == str(Path.cwd() / "imgs")  # the same run from another folder: other images


def test_analysis_overwrite_keeps_images_and_checkpoint_inside_out(tiny_timm_checkpoint, tmp_path, capsys):
    """--overwrite with the images and the checkpoint inside --out: both stay where they are and the
    new layer_selection.json names a checkpoint that exists."""
    from conftest import write_images

    arch, st = tiny_timm_checkpoint
    out = tmp_path / "work"
    images = write_images(out / "images")
    ckpt = out / "tiny.safetensors"
    ckpt.write_bytes(st.read_bytes())
    argv = ["--checkpoint", f"m=timm:{arch}:{ckpt}", "--images", str(images), "--out", str(out),
            "--img-size", str(TINY_IMG), "--no-progress", "--bootstrap", "20"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert cli.main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    before = sorted(images.rglob("*"))
    assert cli.main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert ckpt.is_file() and sorted(images.rglob("*")) == before and len(before) == 7
    doc = selection.read(out / "layer_selection.json")
    assert Path(doc["models"]["m"]["weights"]).is_file()
    (aside,) = out.glob("previous-*")
    assert {p.name for p in aside.iterdir()} == {
        RECORD,
        "layer_selection.json",
        "layer_stats.csv",
        "report.html",
        "figures",
    }
    rec = json.loads((out / RECORD).read_text())
    assert rec["command"] == "unip-analyze" and str(ckpt) in rec["identity"]["digests"]
    # Another command's run there is refused, even with --overwrite.
    other = tmp_path / "ft"
    other.mkdir()
    (other / RECORD).write_text(json.dumps({"command": "unip-finetune", "identity": {}, "files": []}))
    bad = [a if a != str(out) else str(other) for a in argv]
    assert cli.main([*bad, "--overwrite"]) == 2
    assert "holds a unip-finetune run" in capsys.readouterr().err


def test_find_images_follows_links_and_refuses_broken_ones_and_loops(tmp_path):
    from unip_analysis.errors import ImageError
    from unip_analysis.images import find_images

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.png").write_bytes(b"x")
    images = tmp_path / "images"
    images.mkdir()
    (images / "b.png").write_bytes(b"x")
    (images / "link.png").symlink_to(elsewhere / "a.png")
    (images / "sub").symlink_to(elsewhere, target_is_directory=True)
    assert find_images(images) == [images / "b.png", images / "link.png", images / "sub" / "a.png"]
    (images / "sub" / "loop").symlink_to(images, target_is_directory=True)
    with pytest.raises(ImageError, match=r"sub/loop: a link back to a folder above it"):
        find_images(images)
    (elsewhere / "loop").unlink()
    (images / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(ImageError, match=r"gone.png: a broken link"):
        find_images(images)


def test_a_folder_digest_covers_its_weights_not_its_checkpoints(tmp_path):
    run = tmp_path / "pretrain_run"
    run.mkdir()
    (run / "student.safetensors").write_bytes(b"w1")
    (run / "student.json").write_text("{}")
    first = output_folder.file_digest(run)
    (run / "checkpoint.pt").write_bytes(b"resumable")
    (run / "log.jsonl").write_text("x\n")
    assert output_folder.file_digest(run) == first
    (run / "student.safetensors").write_bytes(b"w2")
    assert output_folder.file_digest(run) != first
