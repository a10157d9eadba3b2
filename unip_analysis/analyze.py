"""Run a backbone over images and collect per-layer attention statistics while it runs.

Notebook use::

    from unip_analysis import checkpoints, analyze
    bb = checkpoints.load_backbone("mae", "vit_base_patch16_224", "mae_pretrain_vit_base.pth")
    res = analyze.analyze_backbone(bb, analyze.image_dataset("imgs/", 224, "infrared"), name="mae_b")
    res.layer_table()        # pandas DataFrame: layer, nmi, CI, distance, pattern

``nmi="unip"`` measures NMI with UNIP's published function instead of Park et al.'s
(:mod:`unip_analysis.metrics`); the bands and the selection then use the same definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import images as imgs
from .attention import observe_attention
from .checkpoints import LoadedBackbone
from .device import DTYPES, autocast
from .explorer import ExplorerData, ExplorerRecorder, ModelShape, plan_explorer
from .metrics import NMI_EPS, StreamingStatistics, bootstrap_ci, check_nmi_definition
from .patterns import Thresholds, classify, default_thresholds, robustness, select_layer

DEFAULT_QUERY_POINTS: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.7))


def image_dataset(
    folder: str | Path, img_size: int, norm: str = "imagenet", limit: int | None = None
) -> imgs.ImageFolder:
    """The images under ``folder`` (recursive), resized/cropped to ``img_size`` and normalized."""
    files = imgs.find_images(folder)
    if limit is not None:
        files = files[:limit]
    mean, std = imgs.parse_normalization(norm)
    return imgs.ImageFolder(files, img_size, mean, std)


@dataclass
class ModelAnalysis:
    """Per-layer, per-head statistics of one backbone over a set of images."""

    name: str
    family: str
    arch: str
    weights: str
    weights_sha256: str
    depth: int
    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    heads_per_layer: list[int]
    img_size: int
    grid: tuple[int, int]
    head_nmi: list[np.ndarray]  # per layer: [images, heads]
    head_distance: list[np.ndarray]  # per layer: [images, heads], pixels
    query_points: list[tuple[float, float]]
    query_tokens: list[int]
    query_maps: list[np.ndarray]  # per layer: [map_images, points, heads, grid_h, grid_w]
    map_images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nmi_definition: str = "park"  # what head_nmi holds: metrics.NMI_DEFINITIONS
    explorer: ExplorerData | None = None  # every layer's attention of a few images (--explore-images)
    # Attention sinks (metrics.sink_result), per layer [images, heads]: the largest share of the patch
    # queries' attention one token receives, the prefix tokens' share, which token (index, prefix
    # first) and its key's norm over the median key norm of the same head and image.
    head_sink_share: list[np.ndarray] = field(default_factory=list)
    head_prefix_share: list[np.ndarray] = field(default_factory=list)
    head_sink_token: list[np.ndarray] = field(default_factory=list)
    head_sink_key_ratio: list[np.ndarray] = field(default_factory=list)
    prefix_names: list[str] = field(default_factory=list)  # "cls", "dist", "reg0".. in token order

    @property
    def n_images(self) -> int:
        return int(self.head_nmi[0].shape[0])

    def layer_nmi(self) -> np.ndarray:
        """Layer NMI: mean over heads and images (method.md section 1)."""
        return np.array([h.mean() for h in self.head_nmi])

    def layer_distance(self) -> np.ndarray:
        return np.array([d.mean() for d in self.head_distance])

    def has_sinks(self) -> bool:
        """Whether the sink statistics were measured (analyses built before them have none)."""
        return len(self.head_sink_share) == self.depth

    def token_name(self, token: int) -> str | int:
        """A token index as layer_selection.json names it: "cls", "dist", "reg0".. or the patch
        index (0-based, row-major)."""
        npt = self.num_prefix_tokens
        if token < npt:
            return self.prefix_names[token] if token < len(self.prefix_names) else f"prefix{token}"
        return int(token - npt)

    def sink_token(self, layer: int, head: int | None = None) -> str | int:
        """The most frequent sink token of ``layer`` (0-based) over images and heads (or over
        the images of one ``head``); ties go to the lowest token index."""
        tokens = self.head_sink_token[layer]
        tokens = tokens if head is None else tokens[:, head]
        return self.token_name(int(np.bincount(tokens.reshape(-1)).argmax()))

    def layer_table(self, thresholds: Thresholds | None = None, n_boot: int = 1000) -> pd.DataFrame:
        th = thresholds or default_thresholds(self.grid, self.nmi_definition)
        rows = []
        for i, (hn, hd) in enumerate(zip(self.head_nmi, self.head_distance)):
            lo, hi = bootstrap_ci(hn.mean(axis=1), n_boot=n_boot, seed=i)
            v = float(hn.mean())
            rows.append(
                {
                    "model": self.name,
                    "layer": i + 1,
                    "heads": hn.shape[1],
                    "nmi": v,
                    "nmi_ci_lo": lo,
                    "nmi_ci_hi": hi,
                    "attn_distance": float(hd.mean()),
                    "pattern": classify(v, th),
                }
            )
        return pd.DataFrame(rows)

    def head_table(self) -> pd.DataFrame:
        """Tidy: one row per layer x head, averaged over images."""
        rows = []
        for i, (hn, hd) in enumerate(zip(self.head_nmi, self.head_distance)):
            for h in range(hn.shape[1]):
                rows.append(
                    {
                        "model": self.name,
                        "layer": i + 1,
                        "head": h + 1,
                        "nmi": float(hn[:, h].mean()),
                        "nmi_std": float(hn[:, h].std()),
                        "attn_distance": float(hd[:, h].mean()),
                        **self.head_sinks(i, h),
                    }
                )
        return pd.DataFrame(rows)

    def head_sinks(self, layer: int, head: int) -> dict:
        """One head's sink statistics over images (layer and head 0-based): sink_share,
        prefix_share, sink_token (most frequent), sink_key_norm_ratio; empty without them."""
        if not self.has_sinks():
            return {}
        return {
            "sink_share": float(self.head_sink_share[layer][:, head].mean()),
            "prefix_share": float(self.head_prefix_share[layer][:, head].mean()),
            "sink_token": self.sink_token(layer, head),
            "sink_key_norm_ratio": float(self.head_sink_key_ratio[layer][:, head].mean()),
        }


def query_token_indices(points: Sequence[tuple[float, float]], grid: tuple[int, int]) -> list[int]:
    """(y, x) fractions of the image -> patch-token indices on a (rows, cols) grid."""
    out = []
    for y, x in points:
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise ValueError(f"query point ({y}, {x}) must be fractions of the image in [0, 1]")
        r = min(int(y * grid[0]), grid[0] - 1)
        c = min(int(x * grid[1]), grid[1] - 1)
        out.append(r * grid[1] + c)
    return out


class LayerObserver:
    """Turns each layer's attention rows into per-(image, head) NMI and distance as they arrive,
    and keeps the rows of a few query points of the first ``map_images`` images for figures.

    ``nmi[layer]`` / ``distance[layer]``: one [B, H] tensor per forward; ``maps[layer]``: one
    [images, points, H, grid_h, grid_w] tensor per forward that still had figure images to keep.
    ``nmi_definition``: 'park' or 'unip' (whose NMI also reads the prefix tokens' rows).
    """

    def __init__(
        self,
        depth: int,
        grid: tuple[int, int],
        patch_size: int,
        num_prefix_tokens: int,
        query_tokens: Sequence[int] = (),
        map_images: int = 0,
        device: torch.device | str = "cpu",
        nmi_definition: str = "park",
        explorer: ExplorerRecorder | None = None,
    ):
        self.grid, self.patch_size, self.npt, self.device = grid, patch_size, num_prefix_tokens, device
        self.nmi_definition = check_nmi_definition(nmi_definition)
        self.query_tokens = list(query_tokens)
        self.map_images_left = map_images
        self.nmi: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.distance: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.maps: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        # per layer, one [B, H] tensor per forward each: sink share, prefix share, sink token, and
        # the sink token's key norm over the median key norm (metrics.sink_result)
        self.sinks: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(depth)]
        self._key_norms: torch.Tensor | None = None
        self._stats: StreamingStatistics | None = None
        self._rows: torch.Tensor | None = None
        self._take = 0
        self.explorer = explorer

    def projections(self, layer: int, q: torch.Tensor, scale: float, k: torch.Tensor, bias) -> None:
        """Each layer's q and k (attention.ProjectionObserver): the keys' norms for the sink
        statistics, then the explorer's, when there is one."""
        self._key_norms = torch.linalg.vector_norm(k.float(), dim=-1)  # [B, H, tokens]
        if self.explorer is not None:
            self.explorer.projections(layer, q, scale, k, bias)

    def start_batch(self, batch: int) -> None:
        """Called before each forward: how many of this batch's images the figures still need."""
        self._take = min(batch, self.map_images_left)
        self.map_images_left -= self._take

    def start_layer(self, layer: int, shape: tuple[int, int, int]) -> None:
        batch, heads, _ = shape
        self._stats = StreamingStatistics(
            batch, heads, self.grid, self.patch_size, self.npt, self.device, self.nmi_definition
        )
        self._rows = None
        if self._take and self.query_tokens:
            n = self.grid[0] * self.grid[1]
            self._rows = torch.zeros(self._take, len(self.query_tokens), heads, n)

    def softmax_rows(self, layer: int, q0: int, logits: torch.Tensor, h0: int = 0) -> torch.Tensor:
        """attention.SoftmaxObserver: the block's softmax, taken while the statistics reduce it."""
        probs = (
            self._stats.add_logits_(q0, logits, h0)
            if q0 >= self.npt or self._stats.unip
            else logits.softmax(-1)
        )
        self._keep_figure_rows(q0, probs, h0)
        return probs

    def rows(self, layer: int, q0: int, probs: torch.Tensor, h0: int = 0) -> None:
        if q0 >= self.npt or self._stats.unip:  # prefix queries: part of UNIP's NMI only
            self._stats.add_(q0, probs, h0)
        self._keep_figure_rows(q0, probs, h0)

    def _keep_figure_rows(self, q0: int, probs: torch.Tensor, h0: int) -> None:
        if self._rows is None or q0 < self.npt:
            return
        p0, p1 = q0 - self.npt, q0 - self.npt + probs.shape[2]
        heads = slice(h0, h0 + probs.shape[1])
        for j, token in enumerate(self.query_tokens):
            if p0 <= token < p1:
                row = probs[: self._take, :, token - p0, self.npt :] + NMI_EPS  # [images, h, P]
                self._rows[:, j, heads] = (row / row.sum(-1, keepdim=True)).cpu()

    def end_layer(self, layer: int) -> None:
        layer_nmi, layer_dist = self._stats.result()
        self.nmi[layer].append(layer_nmi.cpu())
        self.distance[layer].append(layer_dist.cpu())
        if self._rows is not None:
            self.maps[layer].append(self._rows.reshape(*self._rows.shape[:3], *self.grid))
        share, prefix, token = self._stats.sinks()
        norms = self._key_norms
        ratio = norms.gather(-1, token.unsqueeze(-1)).squeeze(-1) / norms.median(dim=-1).values
        self.sinks[layer].append((share.cpu(), prefix.cpu(), token.cpu(), ratio.double().cpu()))
        self._stats = self._rows = self._key_norms = None


def explorer_shape(backbone: LoadedBackbone) -> ModelShape:
    """What the explorer's size depends on (heads and head size per layer, grid, prefix tokens)."""
    blocks = list(backbone.model.blocks)
    return ModelShape(
        tuple(int(b.attn.num_heads) for b in blocks),
        tuple(_head_dim(b.attn) for b in blocks),
        tuple(int(g) for g in backbone.model.patch_embed.grid_size),
        backbone.num_prefix_tokens,
    )


def explorer_recorder(
    backbone: LoadedBackbone,
    dataset: torch.utils.data.Dataset,
    explore_images: int,
    budget: int | None = None,
    qk_embedding: str = "pca",
) -> ExplorerRecorder | None:
    """The recorder keeping the attention of the first ``explore_images`` images (None for 0)."""
    if explore_images <= 0:
        return None
    shape = explorer_shape(backbone)
    plan = plan_explorer(shape, min(explore_images, len(dataset)), budget, qk_embedding)
    return ExplorerRecorder(plan, shape, getattr(dataset, "mean", None), getattr(dataset, "std", None))


def forward_all(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    observer: LayerObserver,
    recorder: ExplorerRecorder | None,
    device: str | torch.device,
    dtype: torch.dtype | None,
    bar_title: str,
    progress: bool,
) -> None:
    """One forward pass over every batch with ``observer`` reducing each layer's attention."""
    bar = tqdm(loader, desc=bar_title, unit="batch", disable=not progress, leave=False)
    with observe_attention(model, observer):
        for batch in bar:
            observer.start_batch(batch.shape[0])
            if recorder is not None:
                recorder.start_batch(batch)
            with autocast(device, dtype):
                model.forward_features(batch.to(device, non_blocking=True))


def analysis_result(
    backbone: LoadedBackbone,
    name: str,
    grid: tuple[int, int],
    observer: LayerObserver,
    recorder: ExplorerRecorder | None,
    query_points: Sequence[tuple[float, float]],
    files: Sequence,
    map_images: int,
    nmi: str,
) -> ModelAnalysis:
    """The :class:`ModelAnalysis` of a finished pass: the backbone's facts and the per-head arrays."""
    return ModelAnalysis(
        name=name,
        family=backbone.family,
        arch=backbone.arch,
        weights=backbone.path,
        weights_sha256=backbone.sha256,
        depth=backbone.depth,
        embed_dim=backbone.embed_dim,
        patch_size=backbone.patch_size,
        num_prefix_tokens=backbone.num_prefix_tokens,
        heads_per_layer=backbone.heads_per_layer,
        img_size=backbone.img_size,
        grid=grid,
        head_nmi=[torch.cat(v).double().numpy() for v in observer.nmi],
        head_distance=[torch.cat(v).double().numpy() for v in observer.distance],
        query_points=[tuple(p) for p in query_points],
        query_tokens=observer.query_tokens,
        query_maps=[torch.cat(v).numpy() if v else np.zeros((0,)) for v in observer.maps],
        map_images=[str(f) for f in files[:map_images]],
        notes=list(backbone.notes),
        nmi_definition=nmi,
        explorer=None if recorder is None else recorder.result([_label(f) for f in files]),
        **_sink_arrays(observer.sinks),
        prefix_names=prefix_token_names(backbone.model),
    )


def _sink_arrays(sinks: Sequence[Sequence[tuple[torch.Tensor, ...]]]) -> dict[str, list[np.ndarray]]:
    """The observer's per-forward sink tensors as ModelAnalysis' per-layer [images, heads] arrays."""
    names = ("head_sink_share", "head_prefix_share", "head_sink_token", "head_sink_key_ratio")
    return {
        name: [torch.cat([f[i] for f in layer]).numpy() for layer in sinks] for i, name in enumerate(names)
    }


def prefix_token_names(model: torch.nn.Module) -> list[str]:
    """The prefix tokens of a timm ViT in token order, as its ``_pos_embed`` concatenates them:
    "cls", then "dist" (DeiT distilled), then "reg0", "reg1".. (registers)."""
    names = ["cls"] if getattr(model, "cls_token", None) is not None else []
    names += ["dist"] if getattr(model, "dist_token", None) is not None else []
    reg = getattr(model, "reg_token", None)
    names += [f"reg{i}" for i in range(0 if reg is None else int(reg.shape[1]))]
    if len(names) != int(getattr(model, "num_prefix_tokens", len(names))):
        names = [f"prefix{i}" for i in range(int(model.num_prefix_tokens))]  # an order we do not know
    return names


@torch.inference_mode()
def analyze_backbone(
    backbone: LoadedBackbone,
    dataset: torch.utils.data.Dataset,
    name: str = "model",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    query_points: Sequence[tuple[float, float]] = DEFAULT_QUERY_POINTS,
    map_images: int = 1,
    num_workers: int = 0,
    progress: bool = True,
    precision: str = "fp32",
    nmi: str = "park",
    explore_images: int = 0,
    explore_budget: int | None = None,
    qk_embedding: str = "pca",
) -> ModelAnalysis:
    """Forward every image once; reduce each layer's attention to NMI / distance as it is produced.

    Attention is computed a block of query rows at a time and reduced at once, so no layer's
    whole [B, H, N, N] map exists (plus ``map_images`` x query rows kept for figures).
    ``precision`` bf16 / fp16 runs the model under autocast; the logits, softmax and statistics
    stay in fp32 / fp64. ``nmi``: 'park' (Park et al., patch tokens) or 'unip' (UNIP's published
    function on the whole map), see :mod:`unip_analysis.metrics`. ``explore_images`` > 0 also
    keeps every layer's attention of that many first images for the attention explorer, encoded
    within ``explore_budget`` bytes, and their queries and keys in 2-D by ``qk_embedding`` (pca,
    tsne, umap; :func:`unip_analysis.explorer.qk_view`) (:mod:`unip_analysis.explorer`).
    """
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(DTYPES)}")
    check_nmi_definition(nmi)
    model = backbone.model.to(device).eval()
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    q_idx = query_token_indices(query_points, grid)
    recorder = explorer_recorder(backbone, dataset, explore_images, explore_budget, qk_embedding)
    observer = LayerObserver(
        backbone.depth,
        grid,
        backbone.patch_size,
        backbone.num_prefix_tokens,
        q_idx,
        map_images,
        device,
        nmi,
        recorder,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    forward_all(model, loader, observer, recorder, device, DTYPES[precision], f"analyse {name}", progress)
    files = getattr(dataset, "files", [])
    return analysis_result(backbone, name, grid, observer, recorder, query_points, files, map_images, nmi)


def _head_dim(attn: torch.nn.Module) -> int:
    if getattr(attn, "head_dim", None):
        return int(attn.head_dim)
    qkv = getattr(attn, "qkv", None) or attn.q_proj
    return qkv.weight.shape[0] // (3 if getattr(attn, "qkv", None) is not None else 1) // attn.num_heads


def _label(path: str | Path) -> str:
    return Path(path).name


def layer_sinks(res: ModelAnalysis, layer: int) -> dict:
    """A layer's (0-based) sink fields of layer_selection.json: sink_share, prefix_share and
    sink_key_norm_ratio averaged over heads and images, sink_token the most frequent sink token."""
    if not res.has_sinks():
        return {}
    return {
        "sink_share": float(res.head_sink_share[layer].mean()),
        "prefix_share": float(res.head_prefix_share[layer].mean()),
        "sink_token": res.sink_token(layer),
        "sink_key_norm_ratio": float(res.head_sink_key_ratio[layer].mean()),
    }


def model_entry(
    res: ModelAnalysis,
    thresholds: Thresholds,
    layer: int | None = None,
    fallback: str = "nearest",
    n_boot: int = 1000,
) -> dict:
    """The ``models.NAME`` object of layer_selection.json for one analysis. ``thresholds`` must be
    bands for the analysis' NMI definition (``res.nmi_definition``)."""
    table = res.layer_table(thresholds, n_boot=n_boot)
    sel = select_layer(
        table["nmi"].tolist(), table["pattern"].tolist(), thresholds, override=layer, fallback=fallback
    )
    layers = [
        {
            "layer": int(r.layer),
            "nmi": float(r.nmi),
            "nmi_ci95": [float(r.nmi_ci_lo), float(r.nmi_ci_hi)],
            "attn_distance": float(r.attn_distance),
            "pattern": str(r.pattern),
            "head_nmi": [float(v) for v in res.head_nmi[int(r.layer) - 1].mean(axis=0)],
            **layer_sinks(res, int(r.layer) - 1),
        }
        for r in table.itertuples()
    ]
    return {
        "family": res.family,
        "arch": res.arch,
        "weights": str(Path(res.weights).resolve()),
        "weights_sha256": res.weights_sha256,
        "depth": res.depth,
        "embed_dim": res.embed_dim,
        "patch_size": res.patch_size,
        "num_prefix_tokens": res.num_prefix_tokens,
        "heads_per_layer": list(res.heads_per_layer),
        "layers": layers,
        "selected_layer": sel.layer,
        "selected_heads": None if sel.layer is None else res.heads_per_layer[sel.layer - 1],
        "selection_rule": sel.rule,
        "robustness": robustness(
            [lay["nmi"] for lay in layers], [lay["nmi_ci95"] for lay in layers], thresholds, fallback
        ),
    }
