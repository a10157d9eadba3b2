"""What a unip-finetune run folder holds and how a run is configured: --config files (JSON/TOML),
config.json written before the first step and readable back, log.jsonl + TensorBoard scalars, a bare
--resume, and the real dataset layouts through the command line (their decisions printed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unip_train.finetune.cli import COMMAND, finetune_config, main
from unip_train.finetune.config import resolve
from unip_train.finetune.trainer import config_record
from unip_train.synthetic import generate


def common(ckpt: tuple[str, Path], data: Path, dataset: str = "folder") -> list[str]:
    arch, path = ckpt
    return [
        "--backbone", f"timm:{arch}:{path}", "--dataset", dataset, "--data-root", str(data), "--img-size", "32",
        "--batch-size", "2", "--workers", "0", "--head-channels", "16", "--aux-channels", "16",
        "--lr", "1e-3", "--log-every", "1", "--no-progress",
    ]  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return generate(tmp_path / "data", "folder", n_train=4, n_test=2, size=40, seed=0)


def test_config_file_sets_defaults_and_config_json_repeats_the_run(
    tiny_timm_checkpoint, folder, tmp_path, capsys
):
    """A TOML file of an earlier version's keys (crop, num_workers) still reads, with a notice; the run's
    config.json given back as --config parses to the run's resolved options exactly and repeats it."""
    arch, path = tiny_timm_checkpoint
    toml = tmp_path / "ft.toml"
    toml.write_text(
        f'backbone = "timm:{arch}:{path}"\ndataset = "folder"\ndata_root = "{folder}"\ncrop = 32\n'
        "batch_size = 2\nnum_workers = 0\nhead_channels = 16\naux_channels = 16\niters = 50\nlr = 1e-3\n"
        "progress = false\n"
    )
    first = tmp_path / "first"
    assert main(["--config", str(toml), "--iters", "2", "--out", str(first)]) == 0  # the flag wins
    err = capsys.readouterr().err
    assert f"{toml}: key crop is deprecated; use img_size" in err and "key num_workers is deprecated" in err
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["iters"] == 2 and cfg["img_size"] == 32 and cfg["workers"] == 0 and cfg["head_channels"] == 16
    assert "crop" not in cfg and "amp" not in cfg and cfg["precision"] == "auto"
    # Resolved recipe values are written out, not left as "default".
    assert (cfg["drop_path"], cfg["layer_scale"], cfg["rel_pos_bias"], cfg["layer_decay"]) == (
        0.1,
        1.0,
        False,
        0.85,
    )
    assert cfg["warmup_iters"] == 0 and cfg["eval_split"] == "test" and cfg["world_size"] == 1
    assert "resume" not in cfg and cfg["extensions"] == []

    # --config config.json parses to the recorded options, and resolves to the same record.
    parsed = COMMAND.parse(["--config", str(first / "config.json")])
    recorded = {k: v for k, v in cfg.items() if k not in ("world_size", "extensions")}
    assert config_record(resolve(finetune_config(parsed))) == recorded
    assert {k: v for k, v in COMMAND.record(parsed).items() if k in recorded} == recorded

    second = tmp_path / "second"
    assert main(["--config", str(first / "config.json"), "--out", str(second)]) == 0
    again = json.loads((second / "config.json").read_text())
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in cfg.items() if k != "out"}
    a = torch.load(first / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(second / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, repeated from its config.json


def test_layers_from_a_json_config(tiny_timm_checkpoint, folder, tmp_path):
    cfg = tmp_path / "lp.json"
    cfg.write_text(json.dumps({"mode": "lp", "layers": [2, 4], "iters": 2}))
    out = tmp_path / "lp"
    assert main([*common(tiny_timm_checkpoint, folder), "--config", str(cfg), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["layers"] == [2, 4]
    assert json.loads((out / "metrics.json").read_text())["layers"] == [2, 4]


def test_config_file_errors_are_one_line(tiny_timm_checkpoint, folder, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"iterations": 5}))
    code = main([*common(tiny_timm_checkpoint, folder), "--config", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{bad}: unknown option(s) iterations" in err
    assert not (tmp_path / "r").exists()


def test_a_resume_inside_a_logging_window_logs_the_mean_of_the_iterations_it_ran(
    tiny_timm_checkpoint, folder, tmp_path
):
    """Resumed at iteration 3 with --log-every 4, the first line (iteration 4) averages the one
    iteration this process ran, not four. The same two commands with --log-every 1 give every
    iteration's loss (logging does not change the training)."""

    def losses(out: Path, log_every: int) -> dict[int, float]:
        args = [*common(tiny_timm_checkpoint, folder), "--log-every", str(log_every), "--out", str(out)]
        assert main([*args, "--iters", "3", "--ckpt-every", "3"]) == 0
        assert main([*args, "--iters", "6", "--resume"]) == 0
        lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return {r["iter"]: r["loss"] for r in lines if "loss" in r}

    every, windows = losses(tmp_path / "every", 1), losses(tmp_path / "windows", 4)
    assert sorted(every) == [1, 2, 3, 4, 5, 6] and sorted(windows) == [3, 4, 6]
    assert windows[3] == pytest.approx((every[1] + every[2] + every[3]) / 3, rel=1e-6)
    assert windows[4] == pytest.approx(every[4], rel=1e-6)
    assert windows[6] == pytest.approx((every[5] + every[6]) / 2, rel=1e-6)


def test_log_and_tensorboard_scalars_and_bare_resume(tiny_timm_checkpoint, folder, tmp_path):
    out = tmp_path / "run"
    args = [*common(tiny_timm_checkpoint, folder), "--out", str(out)]
    assert main([*args, "--iters", "2"]) == 0
    assert main([*args, "--iters", "4", "--resume"]) == 0  # bare: continue this run folder
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 for r in steps)
    # Where the time went: wall seconds per iteration, of which waiting for batches.
    assert all(0 < r["data_time"] < r["iter_time"] for r in steps)
    assert [r["resumed_from"] for r in log if r.get("event") == "start"] == [0, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/ce", "train/aux_ce", "eval/miou"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    miou = json.loads((out / "metrics.json").read_text())["miou"]
    assert (
        acc.Scalars("eval/miou")[-1].value == pytest.approx(miou) and acc.Scalars("eval/miou")[-1].step == 4
    )


def test_scut_as_released_through_the_cli(tiny_timm_checkpoint, tmp_path, capsys):
    data = generate(tmp_path / "scut", "scut", n_train=4, n_test=2, size=40, seed=0, variant="release")
    out = tmp_path / "run"
    assert main([*common(tiny_timm_checkpoint, data, "scut"), "--iters", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Cityscapes label IDs" in printed and "test.txt not found" in printed  # never silent
    assert json.loads((out / "config.json").read_text())["label_map"] == "cityscapes"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["split"], metrics["split_file"], metrics["num_images"]) == ("test", "val.txt", 2)
    notes = [
        r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("event") == "start"
    ]
    assert any("Cityscapes label IDs" in n for n in notes[0]["notes"])
    # Told the labels are class indices, the run stops at the first file with the value and the option.
    code = main(
        [*common(tiny_timm_checkpoint, data, "scut"), "--label-map", "none", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.count("\n") == 1
        and "_labelIds.png: label values" in err
        and "--label-map none" in err
    )
    assert not (tmp_path / "x").exists()  # nothing written


def test_mfnet_unip_splits_as_eval_splits(tiny_timm_checkpoint, tmp_path):
    data = generate(tmp_path / "mfnet", "mfnet", n_train=4, n_test=2, size=40, seed=0, variant="unip")
    out = tmp_path / "run"
    args = [*common(tiny_timm_checkpoint, data, "mfnet"), "--iters", "2", "--out", str(out)]
    assert main([*args, "--eval-split", "val_test"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["split_file"], metrics["num_images"]) == ("val_test.txt", 4)
    for split, n in (("test_day", 1), ("test_night", 1)):
        re = tmp_path / split
        assert (
            main(
                [
                    "--eval-only",
                    "--model",
                    str(out / "model.pt"),
                    "--eval-split",
                    split,
                    "--out",
                    str(re),
                    "--no-progress",
                ]
            )
            == 0
        )
        m = json.loads((re / "metrics.json").read_text())
        assert (m["split"], m["split_file"], m["num_images"]) == (split, f"{split}.txt", n)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_folder_is_never_reused_silently(tiny_timm_checkpoint, folder, tmp_path, capsys):
    """Issue 21's data loss: a second run into a finished run's folder is refused in one line with
    every file byte-identical; --overwrite moves the old files into previous-<time>/ (kept, not
    deleted); --resume continues; --resume with nothing to resume is one line and writes nothing."""
    out = tmp_path / "run"
    args = [*common(tiny_timm_checkpoint, folder), "--iters", "2", "--out", str(out)]
    assert main(args) == 0
    before = snapshot(out)
    assert {"checkpoint.pt", "model.pt", "metrics.json", "log.jsonl", "config.json"} <= set(before)
    capsys.readouterr()

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"unip-finetune: error: {out} already holds a unip-finetune run"
    )
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing touched

    assert main([*args, "--overwrite"]) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, every byte of it
    assert (out / "metrics.json").is_file() and (out / "model.pt").is_file()

    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite together" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    assert main([*common(tiny_timm_checkpoint, folder), "--iters", "2", "--out", str(fresh), "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"unip-finetune: error: {fresh}: nothing to resume (no checkpoint.pt); drop --resume to start a run\n"
    )
    assert not fresh.exists()


def test_eval_only_refuses_to_replace_metrics_without_overwrite(
    tiny_timm_checkpoint, folder, tmp_path, capsys
):
    """--eval-only writes metrics.json next to the model; a run's own metrics.json is kept unless
    --overwrite, which moves that one file aside (the model it evaluates stays in place)."""
    out = tmp_path / "run"
    assert main([*common(tiny_timm_checkpoint, folder), "--iters", "2", "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    rescore = ["--eval-only", "--model", str(out / "model.pt"), "--no-progress"]
    assert main(rescore) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} already holds a metrics.json; pass --overwrite" in err
    assert snapshot(out) == before
    assert main([*rescore, "--overwrite"]) == 0
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert [p.name for p in aside.iterdir()] == ["metrics.json"]
    assert (aside / "metrics.json").read_bytes() == before["metrics.json"]
    assert (out / "model.pt").read_bytes() == before["model.pt"]
    assert (
        json.loads((out / "metrics.json").read_text())["miou"] == json.loads(before["metrics.json"])["miou"]
    )


def test_eval_only_into_a_folder_of_its_own_records_what_made_it(
    tiny_timm_checkpoint, folder, tmp_path, capsys
):
    """--eval-only --out NEW writes run.json (the model's sha256, data, split) before its files; the
    same evaluation again is refused unless --overwrite, which moves only its own files aside; another
    model's evaluation, a folder of foreign files and another run's folder are refused in one line."""
    runs_ = {}
    for name, seed in (("a", "0"), ("b", "1")):
        runs_[name] = tmp_path / name
        args = [
            *common(tiny_timm_checkpoint, folder),
            "--iters",
            "2",
            "--seed",
            seed,
            "--out",
            str(runs_[name]),
        ]
        assert main(args) == 0
    capsys.readouterr()
    scored = tmp_path / "scored"

    def rescore(model: Path, *extra: str) -> int:
        return main(["--eval-only", "--model", str(model), "--out", str(scored), "--no-progress", *extra])

    assert rescore(runs_["a"] / "model.pt") == 0
    record = json.loads((scored / "run.json").read_text())
    assert record["command"] == "unip-finetune" and record["identity"]["eval_only"] is True
    assert list(record["identity"]["digests"]) == [str((runs_["a"] / "model.pt").resolve())]
    assert {"metrics.json", "log.jsonl"} <= set(record["files"])
    assert {"metrics.json", "log.jsonl", "run.json"} <= {p.name for p in scored.iterdir()}
    before = snapshot(scored)
    capsys.readouterr()
    assert rescore(runs_["a"] / "model.pt") == 2  # the same evaluation: kept
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a unip-finetune --eval-only result" in err
    assert rescore(runs_["b"] / "model.pt") == 2  # another model's: refused, even with the same split
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with other settings" in err
    assert snapshot(scored) == before
    assert rescore(runs_["a"] / "model.pt", "--overwrite") == 0
    (aside,) = [p for p in scored.iterdir() if p.name.startswith("previous-")]
    assert (aside / "metrics.json").read_bytes() == before["metrics.json"]
    assert (scored / "metrics.json").exists() and (scored / "run.json").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text("{}\n")  # someone else's log, no run.json
    assert main(["--eval-only", "--model", str(runs_["a"] / "model.pt"), "--out", str(foreign)]) == 2
    assert "holds log.jsonl not written by unip-finetune" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["log.jsonl"]
    legacy = tmp_path / "legacy"  # an evaluation from before run records: its metrics.json alone
    legacy.mkdir()
    (legacy / "metrics.json").write_text("{}")
    assert main(["--eval-only", "--model", str(runs_["a"] / "model.pt"), "--out", str(legacy)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    b_before = snapshot(runs_["b"])  # another fine-tuning run's folder: not this evaluation's
    assert main(["--eval-only", "--model", str(runs_["a"] / "model.pt"), "--out", str(runs_["b"])]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert snapshot(runs_["b"]) == b_before


def test_a_model_file_of_an_earlier_version_still_loads(tiny_timm_checkpoint, folder, tmp_path):
    """model.pt files written before the renames record crop / amp / num_workers."""
    from unip_train.finetune.model_file import load_model

    out = tmp_path / "run"
    assert main([*common(tiny_timm_checkpoint, folder), "--iters", "2", "--out", str(out)]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    config = dict(state["config"])
    config["crop"], config["amp"], config["num_workers"] = (
        config.pop("img_size"),
        "none",
        config.pop("workers"),
    )
    config.pop("precision")
    torch.save({**state, "config": config}, tmp_path / "old.pt")
    model, cfg, _ = load_model(tmp_path / "old.pt")
    assert (cfg.img_size, cfg.precision, cfg.workers) == (32, "fp32", 0)
    new_model, _, _ = load_model(out / "model.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), new_model.state_dict().values())
    )


def test_old_spellings_parse_to_the_new_options_with_a_notice_each(capsys):
    old = [
        "--crop",
        "64",
        "--amp",
        "none",
        "--num-workers",
        "3",
        "--betas",
        "0.8",
        "0.95",
        "--ckpt-every-steps",
        "7",
    ]
    new = [
        "--img-size",
        "64",
        "--precision",
        "fp32",
        "--workers",
        "3",
        "--betas",
        "0.8,0.95",
        "--ckpt-every",
        "7",
    ]
    assert COMMAND.parse(old) == COMMAND.parse(new)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 6 and all(n.startswith("unip-finetune: note: ") and "deprecated" in n for n in notes)
    assert COMMAND.parse(["--no-amp"]).precision == "fp32"
    assert "--no-amp is deprecated; use --precision fp32" in capsys.readouterr().err


def test_a_run_folder_belongs_to_its_run(tiny_timm_checkpoint, folder, tmp_path, capsys):
    """run.json names the run; --overwrite with the backbone inside --out moves only the run's files
    (the backbone stays, the new run reads it); another command's folder or one inside the dataset
    is refused even with --overwrite; --resume with other settings is refused by the record."""
    arch, st = tiny_timm_checkpoint
    out = tmp_path / "run"
    out.mkdir()
    backbone = out / "backbone.safetensors"
    backbone.write_bytes(st.read_bytes())
    args = [*common((arch, backbone), folder), "--iters", "2", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "unip-finetune" and str(backbone) in record["identity"]["digests"]
    assert {"model.pt", "checkpoint.pt", "metrics.json", "config.json"} <= set(record["files"])
    assert main([*args, "--overwrite"]) == 0
    (aside,) = out.glob("previous-*")
    assert backbone.is_file() and not (aside / backbone.name).exists() and (aside / "model.pt").is_file()
    capsys.readouterr()
    assert main([*args[:-2], "--out", str(out), "--resume", "--seed", "7"]) == 2
    assert "made with other settings (seed: 0 -> 7)" in capsys.readouterr().err
    predictions = tmp_path / "preds"
    predictions.mkdir()
    (predictions / "run.json").write_text(
        json.dumps({"command": "unip-predict", "identity": {}, "files": []})
    )
    assert main([*args[:-2], "--out", str(predictions), "--overwrite"]) == 2
    assert "holds a unip-predict run" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(folder / "runs")]) == 2
    assert "lies inside the input folder" in capsys.readouterr().err and not (folder / "runs").exists()
