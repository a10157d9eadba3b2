"""Run-folder conventions shared by the trainers: --config files, config.json, log.jsonl + TensorBoard,
the default worker count, one-line errors from loader workers."""

from __future__ import annotations

import json

import pytest
import torch

from unip_analysis import workers
from unip_analysis.errors import ImageError, error_line
from unip_train import runs


def test_write_config_is_plain_json(tmp_path):
    runs.write_config(tmp_path, {"out": tmp_path, "betas": (0.9, 0.95), "x": float("nan")})
    data = json.loads((tmp_path / "config.json").read_text())
    assert data == {"out": str(tmp_path), "betas": [0.9, 0.95], "x": None}


def test_scalar_log_truncates_on_resume_and_writes_tensorboard(tmp_path, monkeypatch):
    # The worst case for the purge: the killed run's writer got TensorBoard's ninth file counter
    # and the resumed one its tenth, which sorts first by name within one second.
    from tensorboard.summary.writer import event_file_writer

    uids = iter([9, 10, 11])
    monkeypatch.setattr(event_file_writer._global_uid, "get", lambda: next(uids))
    log = runs.ScalarLog(tmp_path)
    for s in range(1, 6):
        log.write({"step": s, "loss": 1.0 / s, "note": "x"})
    log.write({"event": "eval", "miou": 0.5})  # records without a step are kept, not plotted
    log.close()
    resumed = runs.ScalarLog(tmp_path, resume_step=3)
    resumed.write({"step": 4, "loss": 9.0})
    resumed.close()
    lines = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines] == [1, 2, 3, None, 4]
    assert lines[-1]["loss"] == 9.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert events == {
        1: 1.0,
        2: 0.5,
        3: pytest.approx(1 / 3),
        4: 9.0,
    }  # step 4 and 5 of the killed run purged
    fresh = runs.ScalarLog(tmp_path)  # not resuming: a new log
    fresh.close()
    assert not (tmp_path / "log.jsonl").exists()


def test_default_num_workers_fits_the_machine(monkeypatch):
    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runs.default_num_workers("cuda") == 2
    monkeypatch.setattr(workers, "available_cores", lambda: 64)
    assert runs.default_num_workers("cuda") == runs.MAX_DEFAULT_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert runs.default_num_workers("cuda") == 4


def test_default_num_workers_leaves_the_cpu_to_the_compute(monkeypatch):
    """A model on the CPU computes with torch's threads on the same cores: workers get only the
    cores those threads leave free."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(workers, "available_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert runs.default_num_workers("cpu") == 0
    monkeypatch.setattr(workers, "available_cores", lambda: 16)
    assert runs.default_num_workers("cpu") == 8 and runs.default_num_workers("cuda:0") == 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)
    assert runs.default_num_workers("cpu") == 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs.default_num_workers("auto") == 4  # auto without a GPU is the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs.default_num_workers("auto") == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs.default_num_workers(None) == 8  # no model (unip-rois): every core


def test_clis_resolve_the_worker_default_with_their_device(monkeypatch, tmp_path):
    from dataclasses import replace

    from unip_train.finetune.config import FinetuneConfig, resolve
    from unip_train.pretrain import cli as pretrain_cli

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(workers, "available_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    cfg = FinetuneConfig(
        backbone="timm:vit_tiny_patch16_224:w.safetensors", dataset="soda", data_root=str(tmp_path), out="o",
        device="cpu",
    )  # fmt: skip
    assert resolve(cfg).workers == 0
    assert resolve(replace(cfg, device="cuda")).workers == 4
    assert resolve(replace(cfg, workers=3)).workers == 3
    args, _ = pretrain_cli.parse_args(["--selection", "s.json", "--teacher", "t", "--infrared", "d",
                                       "--device", "cpu", "--out", "o"])  # fmt: skip
    assert args.workers == 0


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        raise ImageError(f"/data/x{i}.png: cannot decode image; remove or replace the file")


def test_error_line_reduces_a_worker_traceback_to_the_original_message():
    loader = torch.utils.data.DataLoader(_Unreadable(), batch_size=1, num_workers=1)
    with pytest.raises(ImageError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)
    assert error_line(info.value) == "/data/x0.png: cannot decode image; remove or replace the file"


def test_scalar_log_plots_one_curve_per_list_element(tmp_path):
    log = runs.ScalarLog(tmp_path)
    log.write({"step": 1, "scale_mean": [0.5, 0.25], "flag": True})
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert sorted(tags) == ["train/scale_mean/0", "train/scale_mean/1"]
    assert acc.Scalars("train/scale_mean/1")[0].value == 0.25


def test_wait_clock_times_only_the_waits_and_draws_only_what_is_asked():
    import time

    from unip_train.runs import WaitClock

    drawn = []

    def slow(n):
        for i in range(n):
            time.sleep(0.02)  # the loader's work
            drawn.append(i)
            yield i

    clock = WaitClock()
    items = []
    for _, item in zip(range(3), clock.wrap(slow(10))):
        items.append(item)
        time.sleep(0.05)  # the step's work: not a wait
    assert items == [0, 1, 2] and drawn == [0, 1, 2]  # zip stops before asking for a fourth
    waited = clock.take()
    assert 0.06 <= waited < 0.06 + 0.1 and clock.take() == 0.0
    assert list(clock.wrap([])) == [] and clock.take() == 0.0
