"""Shared fixtures: tiny models and images the tests make themselves. No test reaches the network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Two xdist workers share two cores: one thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    """The suite is the CPU suite on every machine (CI has no GPU; bit-identical resume and the CPU
    messages are what it asserts): unless the run selects the CUDA tests (``pytest -m cuda``), CUDA is
    hidden from this process and every process it starts, before torch first looks for a device."""
    if "cuda" not in (config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


# A test or parameter that needs a GPU: selected by ``pytest -m cuda``, skipped where CUDA is not
# visible (asked at set-up, never at import: the suite hides CUDA first, see pytest_configure).
CUDA = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _skip_without_cuda(request):
    if request.node.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (pytest -m cuda on a GPU machine)")


TINY_ARCH = "vit_tiny_patch16_224(depth=4,embed_dim=64,num_heads=2,patch_size=8)"
TINY_IMG = 32  # 4x4 patch grid with patch 8


def write_images(folder: Path, n: int = 6, seed: int = 0, sizes=((40, 48), (32, 32))) -> Path:
    """Grey 8-bit, grey 16-bit and RGB images of mixed sizes, in nested folders."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        kind = i % 3
        if kind == 0:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / f"g8_{i}.png")
        elif kind == 1:
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(
                folder / "sub" / f"g16_{i}.png"
            )
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"rgb_{i}.jpg")
    return folder


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images")


@pytest.fixture
def tiny_timm_checkpoint(tmp_path: Path) -> tuple[str, Path]:
    """(arch, path) of a tiny timm ViT saved as safetensors, with non-trivial weights."""
    from safetensors.torch import save_file

    from unip_analysis.checkpoints import build_vit

    torch.manual_seed(0)
    model = build_vit(TINY_ARCH, img_size=TINY_IMG)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return TINY_ARCH, path


def tiny_finetune_run(root: Path, n_train: int, n_test: int, batch_size: int, iters: int):
    """A tiny LL-FPN + UperNet fine-tuning run on a synthetic SODA layout (48 x 64 images), from a
    random tiny ViT saved as safetensors: returns (dataset root, its config, its metrics); the run is
    ``root / "run"``."""
    from safetensors.torch import save_file

    from unip_analysis.checkpoints import build_vit
    from unip_train.finetune.config import FinetuneConfig
    from unip_train.finetune.trainer import run
    from unip_train.synthetic import generate

    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    save_file(
        {k: v.contiguous() for k, v in build_vit(TINY_ARCH, img_size=32).state_dict().items()}, str(ckpt)
    )
    data = generate(root / "soda", "soda", n_train=n_train, n_test=n_test, size=(48, 64), seed=0)
    cfg = FinetuneConfig(
        backbone=f"timm:{TINY_ARCH}:{ckpt}", dataset="soda", data_root=str(data), out=str(root / "run"),
        img_size=32, head_channels=16, batch_size=batch_size, workers=0, lr=1e-3, progress=False,
        log_every=5, iters=iters,
    )  # fmt: skip
    return data, cfg, run(cfg)
