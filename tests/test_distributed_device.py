"""--device and --precision, one rule for every command (unip_analysis.device): cuda:N is honoured on
one process, refused under torchrun (issue 21), checked against the visible GPUs by the analysis too;
the option accepts what the resolver accepts; precision auto is the shared rule.

The GPU is faked (torch.cuda.is_available / device_count), so these run on CPU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from unip_analysis import cli as analysis_cli
from unip_analysis import command
from unip_analysis import device as rules
from unip_analysis.errors import SpecError
from unip_train import precision
from unip_train.distributed import resolve_device
from unip_train.predict import inference


def _machine(monkeypatch, gpus: int, world: int = 1, local: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))


@pytest.mark.parametrize("index", [0, 1, 3])
def test_single_process_honours_the_index(monkeypatch, index):
    _machine(monkeypatch, gpus=4, local=2)  # a stray LOCAL_RANK must not move a single process
    assert resolve_device(f"cuda:{index}") == torch.device("cuda", index)


def test_single_process_cuda_and_auto_take_gpu_0(monkeypatch):
    _machine(monkeypatch, gpus=2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_auto_without_gpu_is_cpu(monkeypatch):
    _machine(monkeypatch, gpus=0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_index_past_the_visible_gpus_is_refused(monkeypatch):
    _machine(monkeypatch, gpus=2)
    with pytest.raises(SpecError, match=r"cuda:2.*sees 2 GPU"):
        resolve_device("cuda:2")


def test_cuda_without_gpu_is_refused(monkeypatch):
    _machine(monkeypatch, gpus=0)
    with pytest.raises(SpecError, match="no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("local", [0, 1, 3])
def test_torchrun_cuda_takes_the_local_rank(monkeypatch, local):
    _machine(monkeypatch, gpus=4, world=4, local=local)
    assert resolve_device("cuda") == torch.device("cuda", local)
    assert resolve_device("auto") == torch.device("cuda", local)


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_torchrun_refuses_an_explicit_index(monkeypatch, device):
    _machine(monkeypatch, gpus=4, world=2, local=1)
    with pytest.raises(SpecError, match=r"--device cuda.*CUDA_VISIBLE_DEVICES") as err:
        resolve_device(device)
    assert "\n" not in str(err.value)


def test_torchrun_with_more_processes_than_gpus_is_refused(monkeypatch):
    _machine(monkeypatch, gpus=2, world=4, local=2)
    with pytest.raises(SpecError, match="2 GPU"):
        resolve_device("cuda")


def test_torchrun_on_cpu(monkeypatch):
    _machine(monkeypatch, gpus=0, world=2, local=1)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda1", "mps"])
def test_unknown_device_is_refused(monkeypatch, device):
    _machine(monkeypatch, gpus=1)
    with pytest.raises(SpecError, match="expected cpu, cuda, cuda:N or auto"):
        resolve_device(device)


def test_the_analysis_checks_cuda_n_against_the_visible_gpus(monkeypatch):
    _machine(monkeypatch, gpus=2)
    assert analysis_cli.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SpecError, match=r"sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        analysis_cli.resolve_device("cuda:3")


@dataclass(kw_only=True)
class _Opts:
    device: str = command.device()
    precision: str = command.precision()


@pytest.mark.parametrize("value", ["mps", "gpu", "cuda:x"])
def test_device_option_refuses_what_the_resolver_refuses(value):
    with pytest.raises(SpecError, match=f"--device: '{value}': expected cpu, cuda, cuda:N or auto"):
        command.Command("unip-toy", _Opts, description="").parse(["--device", value])


def test_precision_is_one_rule_declared_once(monkeypatch):
    assert command.PRECISIONS is rules.PRECISIONS is precision.PRECISIONS is inference.PRECISIONS
    _machine(monkeypatch, gpus=1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert analysis_cli.resolve_precision("auto", torch.device("cuda", 0)) == "fp16"  # as the trainers
    assert precision.amp_dtype("auto", "cuda") == torch.float16
    assert analysis_cli.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(SpecError, match="fp16 needs CUDA"):
        analysis_cli.resolve_precision("fp16", "cpu")
