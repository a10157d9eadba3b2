"""The one pre- and post-processing path of a fine-tuned model, shared by the PyTorch and ONNX backends.

Pre-processing is the fine-tuning evaluation's, piece by piece (:mod:`unip_train.finetune.dataset`,
:mod:`unip_train.finetune.augment`): the file read as the dataset reads it (:func:`read_pixels`: 8-bit
grey for the infrared layouts as OpenCV reads it (colour averaged, 16-bit its high byte), the 4th channel of
4-channel RGB-T files for MFNet; 8-bit colour for the RGB / depth layouts), resized keeping its ratio
to the run's evaluation scale (:class:`EvalResize`), normalized with the run's ``--norm`` and made
three channels (:func:`to_input`). Post-processing is evaluation's too
(:func:`~unip_train.finetune.evaluation.full_size_logits`): sliding windows of the run's size and
stride, logits averaged, resized bilinearly to the original image, argmax. A backend only maps a
normalized batch of windows [B, 3, win, win] to logits [B, C, win, win].

What a model needs besides its weights is a :class:`ModelInfo`: read from ``model.pt`` (classes,
palette, config) or from the ONNX file's sidecar JSON (:meth:`ModelInfo.sidecar`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from unip_analysis.device import PRECISIONS, autocast_dtype, precision_name, resolve_device
from unip_analysis.errors import SpecError, UnipError, error_line
from unip_analysis.files import read_json
from unip_analysis.images import parse_normalization

from ..finetune.augment import EvalResize
from ..finetune.config import FinetuneConfig
from ..finetune.dataset import read_pixels, scaled_norm, to_input
from ..finetune.evaluation import LogitsFn, full_size_logits, upsampled_logits
from ..finetune.layouts import get_layout, img_scale
from ..finetune.model_file import load_model
from ..precision import normalize_amp

SIDECAR_FORMAT = "unip-export/1"
BACKENDS = ("auto", "torch", "onnx")
RUN_PRECISION = "run"  # --precision run: the run's own --precision, as its evaluation ran


class PredictError(UnipError):
    """A model, image list or label folder that ``unip-predict`` / ``unip-export`` cannot use."""


@dataclass(frozen=True)
class ModelInfo:
    """Everything pre- and post-processing need, and what a deployer needs beside an exported graph.

    ``channels``: 1 (grey infrared: colour files averaged, 16-bit scaled, ``thermal_channel``: the 4th
    channel of 4-channel files) or 3 (colour / depth, 8-bit); ``mean`` / ``std``: per channel on the
    0-1 scale (``norm``: their name); ``scale``: the evaluation resize keeps the ratio to fit
    (long, short) edges; ``window`` / ``stride``: sliding-window inference.
    """

    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    norm: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    thermal_channel: bool
    scale: tuple[int, int]
    window: int
    stride: int
    patch: int
    dataset: str
    data_root: str
    eval_split: str
    label_map: str
    amp: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def palette_array(self) -> np.ndarray:
        """[C, 3] uint8: the colour of each class."""
        return np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3)

    def sidecar(self, opset: int | None = None) -> dict:
        """The sidecar JSON of an exported graph (the channel rule spelled out for a deployer)."""
        d = asdict(self)
        d.update(classes=list(self.classes), palette=[list(c) for c in self.palette])
        d.update(mean=list(self.mean), std=list(self.std), scale=list(self.scale))
        if self.channels == 1:
            reading = (
                "read the file as 8-bit grey: 8-bit grey as is, 16-bit grey its high byte (v >> 8), colour the "
                "mean of R, G, B rounded to the nearest integer"
                + (", 4-channel RGB-T files their 4th (thermal) channel" if self.thermal_channel else "")
                + "; replicate it to 3 channels"
            )
        else:
            reading = "read the file as 8-bit RGB (grey replicated, alpha dropped; 16-bit files refused)"
        return {
            "format": SIDECAR_FORMAT,
            **d,
            "opset": opset,
            "input": "float32 [B, 3, window, window]: (value / 255 - mean) / std per channel",
            "output": "float32 [B, num_classes, window, window]: per-class logits at input size",
            "channel_rule": (
                f"{reading}; resize (bilinear) keeping the ratio to fit scale (long, short edge); windows of "
                "window x window every stride pixels, the last ending at the border, smaller images padded "
                "with 0 after normalization; average overlapping logits, resize bilinearly to the image, argmax"
            ),
        }

    @classmethod
    def from_sidecar(cls, path: Path) -> ModelInfo:
        data = read_json(path, PredictError, "sidecar", "export the model again with unip-export")
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise PredictError(
                f"{path}: not a unip-export sidecar (format {SIDECAR_FORMAT}); export the model again"
            )
        try:
            return cls(
                classes=tuple(data["classes"]),
                palette=read_palette(data["palette"], len(data["classes"]), path),
                mean=tuple(data["mean"]),
                std=tuple(data["std"]),
                scale=tuple(data["scale"]),
                **{
                    k: data[k]
                    for k in cls.__dataclass_fields__
                    if k not in ("classes", "palette", "mean", "std", "scale")
                },
            )
        except KeyError as e:
            raise PredictError(
                f"{path}: sidecar lacks {e}; export the model again with unip-export"
            ) from None


def read_palette(value, num_classes: int, path: Path) -> tuple[tuple[int, int, int], ...]:
    """A model's palette as one (r, g, b) per class; refused (never defaulted) when missing or short.

    Accepts a list of triples or a flat list of 3 x C values (what ``Image.putpalette`` takes)."""
    if value is None:
        raise PredictError(
            f"{path}: the model file has no palette (class colours); unip-predict will not pick colours "
            "silently: fine-tune again with this version, which saves the dataset's palette in model.pt"
        )
    flat = np.asarray(value).reshape(-1) if len(value) else np.zeros(0)
    if flat.size < 3 * num_classes or ((flat < 0) | (flat > 255)).any():
        raise PredictError(
            f"{path}: palette holds {flat.size} values, expected 3 x {num_classes} classes in 0..255; "
            "fine-tune or export the model again"
        )
    rgb = flat[: 3 * num_classes].astype(int).reshape(num_classes, 3)
    return tuple((int(r), int(g), int(b)) for r, g, b in rgb)


def model_info(path: Path, model: torch.nn.Module, cfg: FinetuneConfig, ckpt: dict) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded ``model.pt`` (what its evaluation used: ``--norm``, the
    dataset's channels and resize scale, the window and stride)."""
    classes = tuple(ckpt["classes"])
    mean, std = parse_normalization(cfg.norm)
    layout = get_layout(cfg.dataset)
    patch = model.backbone.patch_embed.patch_size
    window = int(cfg.eval_window or cfg.img_size)
    return ModelInfo(
        classes=classes,
        palette=read_palette(ckpt.get("palette"), len(classes), path),
        norm=str(cfg.norm),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        channels=int(ckpt.get("channels") or layout.channels),
        thermal_channel=layout.thermal_channel,
        scale=tuple(int(v) for v in img_scale(cfg.dataset, cfg.img_size)),
        window=window,
        stride=int(cfg.eval_stride or max(1, int(window * 2 / 3))),
        patch=int(max(patch) if isinstance(patch, Sequence) else patch),
        dataset=cfg.dataset,
        data_root=str(cfg.data_root),
        eval_split=str(cfg.eval_split),
        label_map=str(cfg.label_map),
        amp=str(cfg.precision),
    )


def model_file(path: str | Path) -> Path:
    """``RUN/model.pt`` for a run folder, the file itself otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise PredictError(f"{path}: not found; pass a finished unip-finetune run folder or its model.pt")
    elif not path.is_file():
        raise PredictError(
            f"{path}: model file not found; pass a run folder, its model.pt or an exported .onnx"
        )
    return path


def load_torch_model(
    path: str | Path, channels_last: bool = False
) -> tuple[torch.nn.Module, ModelInfo, Path]:
    """The segmentor of ``model.pt`` (or a run folder) in eval mode, its :class:`ModelInfo`, its path.
    ``channels_last``: in NHWC memory order when the run trained and evaluated so (``--channels-last``,
    the default; the same results up to summation order, a third faster on the CPU)."""
    path = model_file(path)
    if path.suffix == ".onnx":
        raise PredictError(f"{path}: an ONNX graph; read it with --backend onnx (or auto)")
    model, cfg, ckpt = load_model(path)
    if channels_last and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, model_info(path, model, cfg, ckpt), path


def sidecar_path(onnx_path: Path) -> Path:
    """``model.onnx.json`` beside ``model.onnx``."""
    return onnx_path.with_name(onnx_path.name + ".json")


def precision_dtype(precision: str, info: ModelInfo, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``--precision``: the shared rule (``auto``: bf16 on CUDA, float32 on the CPU),
    or with ``run`` the run's own ``--precision`` (as its evaluation ran)."""
    if precision == RUN_PRECISION:
        return autocast_dtype(normalize_amp(info.amp), device)
    if precision not in PRECISIONS:
        raise SpecError(
            f"--precision {precision!r}: expected one of {', '.join((*PRECISIONS, RUN_PRECISION))}"
        )
    return autocast_dtype(precision, device)


def prepare(path: Path, info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized input [3, h, w] at the evaluation scale, the image as read: grey [H, W] or colour
    [3, H, W], 0-255) of one file, as :class:`~unip_train.finetune.dataset.SegDataset` with
    :class:`EvalResize` makes an evaluation sample."""
    pixels = read_pixels(path, info.channels, info.thermal_channel)  # uint8 [H, W, C]
    h, w = pixels.shape[:2]
    if min(h, w) < info.patch:
        raise PredictError(
            f"{path}: image is {h}x{w} pixels, smaller than one {info.patch}x{info.patch} patch "
            "of the model; segment images of at least one patch"
        )
    img, _ = EvalResize(info.scale)(pixels, None)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float()  # as read, for overlays and panels
    return to_input(img, *scaled_norm(info.mean, info.std)), image[0] if image.shape[0] == 1 else image


@dataclass
class Segmenter:
    """A model ready to segment: its :class:`ModelInfo`, the backend's window function, where and in
    which precision it runs. :meth:`prepare` and :meth:`logits` are the whole path of an image."""

    info: ModelInfo
    fn: LogitsFn
    device: torch.device
    amp: torch.dtype | None
    backend: str
    source: Path

    def prepare(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return prepare(path, self.info)

    @torch.no_grad()
    def logits(self, batch: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits [B, C, *size] (float32, on the device) of a batch of same-size prepared inputs."""
        return full_size_logits(
            self.fn, batch.to(self.device), size, self.info.num_classes, self.info.window, self.info.stride,
            self.amp,
        )  # fmt: skip


def onnx_window_fn(path: Path, device: torch.device) -> LogitsFn:
    """ONNX Runtime over one batch of windows; the CUDA provider when asked for and installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PredictError("--backend onnx needs onnxruntime: pip install 'unip-toolkit[export]'") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PredictError(
                f"--device {device}: this onnxruntime has no CUDA provider; use --device cpu with --backend onnx"
            )
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise PredictError(f"{path}: onnxruntime cannot load the graph ({str(e).splitlines()[0]})") from None
    graph_input = session.get_inputs()[0]

    def fn(x: torch.Tensor) -> torch.Tensor:
        # onnxruntime raises its own types (InvalidArgument, Fail, ...): one line, the traceback with --debug
        try:
            out = session.run(None, {graph_input.name: x.detach().float().cpu().numpy()})[0]
        except Exception as e:
            raise PredictError(
                f"{path}: ONNX Runtime cannot run the graph (input {graph_input.shape}) on windows "
                f"{list(x.shape)}: {error_line(e)}; export the model again with unip-export "
                "(its graph takes any batch), or pass --batch-size 1"
            ) from e
        return torch.from_numpy(out).to(x.device)

    return fn


def open_model(
    path: str | Path, backend: str = "auto", device: str = "auto", precision: str = "auto"
) -> Segmenter:
    """A :class:`Segmenter` of a run folder / ``model.pt`` (torch) or an exported ``.onnx`` (onnx,
    float32: its sidecar gives the rest)."""
    if backend not in BACKENDS:
        raise SpecError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    dev = resolve_device(device)  # the one --device rule: cuda:N checked against the visible GPUs
    path = model_file(path)
    if backend == "auto":
        backend = "onnx" if path.suffix == ".onnx" else "torch"
    if backend == "onnx":
        if path.suffix != ".onnx":
            raise PredictError(f"{path}: --backend onnx reads an exported .onnx file (unip-export)")
        side = sidecar_path(path)
        if not side.is_file():
            raise PredictError(f"{side}: sidecar not found beside the graph; export the model again")
        info = ModelInfo.from_sidecar(side)
        if precision not in ("auto", "fp32"):
            raise SpecError(f"--precision {precision}: the ONNX backend runs the exported float32 graph")
        return Segmenter(info, onnx_window_fn(path, dev), dev, None, "onnx", path)
    model, info, path = load_torch_model(path, channels_last=True)
    model.to(dev)
    return Segmenter(info, upsampled_logits(model), dev, precision_dtype(precision, info, dev), "torch", path)


def describe(seg: Segmenter) -> str:
    """One line: model, backend, device, precision, window."""
    return (
        f"{seg.source} ({seg.backend}, {seg.device}, {precision_name(seg.amp)}): {seg.info.num_classes} classes, "
        f"windows {seg.info.window} stride {seg.info.stride}"
    )
