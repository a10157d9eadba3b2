"""The attention explorer: every layer, head and query of a few images, interactive and offline.

During the analysis' own forward pass the explored images' exact attention rows are at hand
(``softmax(q . k_j + bias_j)`` over all tokens, from the layer's q and k as the analysis uses
them). :class:`ExplorerRecorder` encodes them in every candidate form and measures, for each,
the largest error of every row the page can show, in units of that row's maximum (the page scales
each map to its own maximum):

- ``rows-u8``: each shown row (a head's, and the mean of the heads) as uint8 of its own maximum
  over the patch keys, that maximum and the prefix tokens' values in fp32. Error <= 1/510 of the
  maximum: the colour map's own resolution. N^2 per head.
- ``qk-f16``: q of the patch queries (already scaled by ``head_dim^-0.5``) and k of every token,
  after q/k norm and rotary embedding, in half precision, plus the block's logit bias where it has
  one; the browser computes a row on demand. N x d per head.
- ``qk-i8``: the same as int8 with one fp32 scale per (token, head) vector; far off on trained
  models (outlier channels), the last resort.

:func:`choose_encodings` keeps, per model, the encoding and query stride that the one budget of
the report allows (:func:`option_order`), for every model at once: precision or query stride is
given up before any image; :func:`plan_images` decides the images, the same for every model,
before the pass. The measured error goes with the data to the page, which shows it next to the map.

:func:`row` is the browser's computation in numpy (what the page displays, to float64 rounding);
:func:`unip_analysis.explorer_widget.explore` shows the explorer in Jupyter.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
from PIL import Image

from .patterns import PATTERN_COLORS

DEFAULT_EXPLORE_IMAGES = 4
DEFAULT_BUDGET_MB = 60.0
# Encoded bytes (after gzip + base64) the explorer's data may take in report.html, every model together.
BUDGET_BYTES = int(DEFAULT_BUDGET_MB * 10**6)
ENCODINGS = ("rows-u8", "qk-f16", "qk-i8")
ENCODING_NAMES = {
    "rows-u8": "rows as uint8 of their maximum",
    "qk-f16": "q and k as fp16",
    "qk-i8": "q and k as int8 with a scale per token and head",
}
EXACT = 0.01  # a shown row within 1% of its maximum: exact to the eye (the colour map resolves 0.4%)
_INT8_MAX = 127
_FP16_MAX = 65504.0
# Rows are recorded only while their raw size stays within this many budgets (compression and a
# query stride bring them down); beyond, only q and k are.
_ROWS_RECORD_BUDGETS = 4
_QUERY_BLOCK = 256  # queries per block when computing exact rows (4,097 tokens: 100 MB per block)
QK_EMBEDDINGS = ("pca", "tsne", "umap")
QK_EMBEDDING_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
# Encoded bytes (base64) the query-key view's 2-D points may take per model: every layer, head, image
# and kept token, a query and a key point each, two uint16 coordinates (1.2 MB at ViT-B/16, 224 px,
# 4 images); a patch stride keeps larger grids within it.
QK_BUDGET_BYTES = 2 * 10**6


# --- what to store ---------------------------------------------------------------------------


def query_indices(grid: tuple[int, int], stride: int = 1) -> list[int]:
    """Patch indices (row-major) of the stored queries: every ``stride``-th row and column."""
    rows, cols = grid
    return [r * cols + c for r in range(0, rows, stride) for c in range(0, cols, stride)]


@dataclass(frozen=True)
class ModelShape:
    """What the explorer's size depends on: heads and head size per layer, patch grid, prefix tokens."""

    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    grid: tuple[int, int]
    num_prefix_tokens: int

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.patches + self.num_prefix_tokens

    def rows_bytes(self, images: int, stride: int = 1) -> int:
        """Raw bytes of the rows-u8 encoding: (heads + mean) x stored queries x keys."""
        per_row = self.patches + 4 * (1 + self.num_prefix_tokens)
        queries = len(query_indices(self.grid, stride))
        return images * sum((h + 1) * queries * per_row for h in self.heads)

    def records_rows(self, images: int, budget: int) -> bool:
        """Whether the rows are worth recording: their raw size within reach of the budget."""
        return self.rows_bytes(images) <= _ROWS_RECORD_BUDGETS * budget

    def smallest_bytes(self, images: int, budget: int) -> float:
        """Upper estimate of the smallest option: the widest query stride, rows or int8 q and k."""
        widest = max(self.grid)
        sizes = [self.qk_i8_bytes(images, widest)]
        if self.records_rows(images, budget):
            sizes.append(self.rows_bytes(images, widest) * 4 / 3)
        return min(sizes)

    def qk_view_bytes(self, images: int, stride: int) -> int:
        """Base64 bytes of the query-key view's points (uint16 x, y per query and key) and boxes."""
        tokens = self.num_prefix_tokens + len(query_indices(self.grid, stride))
        raw = sum(self.heads) * (images * tokens * 2 * 2 * 2 + 16)
        return math.ceil(raw / 3) * 4

    def qk_view_stride(self, images: int) -> int:
        """The smallest patch stride whose query-key view fits :data:`QK_BUDGET_BYTES`."""
        stride = 1
        while stride < max(self.grid) and self.qk_view_bytes(images, stride) > QK_BUDGET_BYTES:
            stride += 1
        return stride

    def qk_i8_bytes(self, images: int, stride: int) -> int:
        """Upper estimate of the base64 text of int8 q and k (no credit for compression)."""
        queries = len(query_indices(self.grid, stride))
        raw = sum(h * (d + 4) * (queries + self.tokens) for h, d in zip(self.heads, self.head_dims))
        return math.ceil(images * raw * 4 / 3)


@dataclass
class ExplorerPlan:
    """Before the pass: how many images every model keeps, which encodings are recorded, and why."""

    images: int
    encodings: tuple[str, ...] = ENCODINGS
    budget: int = BUDGET_BYTES
    reductions: list[str] = field(default_factory=list)
    qk_embedding: str = "pca"


def plan_images(
    shapes: Sequence[ModelShape], images: int, budget: int | None = None
) -> tuple[int, list[str]]:
    """The images every model keeps: all asked for unless even the smallest option (the widest
    query stride) of every model together exceeds ``budget``; then fewer, the same for every
    model. Returns the count and what was reduced."""
    budget = BUDGET_BYTES if budget is None else budget

    def smallest(n: int) -> float:
        return sum(s.smallest_bytes(n, budget) for s in shapes)

    n = images
    while n > 1 and smallest(n) > budget:
        n -= 1
    notes = []
    if n < images:
        notes.append(
            f"{n} of the {images} images asked for (--explore-images) in every model: the keys of every "
            f"token of more images exceed the {_mb(budget)} budget (--explore-budget)"
        )
    if smallest(n) > budget:
        notes.append(
            f"still {_mb(smallest(n))}, over the {_mb(budget)} budget: the keys of every token are "
            "needed for any row"
        )
    return n, notes


def plan_explorer(
    shape: ModelShape, images: int, budget: int | None = None, qk_embedding: str = "pca"
) -> ExplorerPlan:
    """The pass' plan for one model: the images (a report of several models asks
    :func:`plan_images` for all of them first and passes the count), the encodings worth
    recording (rows only while their size is within reach) and the query-key view's embedding."""
    budget = BUDGET_BYTES if budget is None else budget
    check_qk_embedding(qk_embedding)
    n, notes = plan_images([shape], images, budget)
    encodings = tuple(e for e in ENCODINGS if e != "rows-u8" or shape.records_rows(n, budget))
    return ExplorerPlan(n, encodings, budget, notes, qk_embedding)


# --- encoding --------------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., d] as the page decodes its int8 form: one scale ``max|x| / 127`` per vector."""
    values, scale = _int8(x)
    return values.float() * scale[..., None]


def _int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(-1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    return torch.round(x / scale[..., None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale


@dataclass
class Encoded:
    """One tensor [heads, n, d] as stored: ``values`` (float16, or int8 with fp32 ``scale`` [heads, n])."""

    values: np.ndarray
    scale: np.ndarray | None = None

    @property
    def dtype(self) -> str:
        return "f16" if self.values.dtype == np.float16 else "i8"

    def take(self, index: Sequence[int] | slice, axis: int = 1) -> Encoded:
        """The vectors ``index`` along ``axis`` (1: tokens)."""
        idx = (slice(None),) * axis + (index,)
        return Encoded(self.values[idx], None if self.scale is None else self.scale[idx])

    def decoded(self) -> np.ndarray:
        """What the browser decodes (float32: a Float32Array)."""
        if self.scale is None:
            return self.values.astype(np.float32)
        return self.values.astype(np.float32) * self.scale[..., None]


def encode_qk(x: torch.Tensor, encoding: str) -> Encoded | None:
    """``x`` [..., n, d] fp32 in ``encoding`` (qk-f16 / qk-i8); None where fp16 would overflow."""
    x = x.float()
    if encoding == "qk-f16":
        if float(x.abs().max()) >= _FP16_MAX:
            return None
        return Encoded(x.to(torch.float16).cpu().numpy())
    values, scale = _int8(x)
    return Encoded(values.cpu().numpy(), scale.cpu().numpy())


@dataclass
class RowsLayer:
    """One image and layer as rows-u8: per (head, or the mean as the last), stored query and patch
    key, ``u8 = round(255 p / max)``; ``scale`` = that maximum over the patch keys, ``prefix`` the
    prefix tokens' attention (fp32). Displayed: ``u8 * scale / 255``."""

    u8: np.ndarray  # [heads + 1, queries, patches] uint8
    scale: np.ndarray  # [heads + 1, queries] float32
    prefix: np.ndarray  # [heads + 1, queries, prefix tokens] float32

    def take(self, queries: Sequence[int]) -> RowsLayer:
        return RowsLayer(self.u8[:, queries], self.scale[:, queries], self.prefix[:, queries])

    def full(self) -> np.ndarray:
        """[heads + 1, queries, tokens] float64, prefix first, as the browser decodes it."""
        patches = self.u8.astype(np.float64) * self.scale.astype(np.float64)[..., None] / 255
        return np.concatenate([self.prefix.astype(np.float64), patches], -1)


def encode_rows(p: torch.Tensor, npt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``p`` [rows, queries, tokens] (prefix first) as uint8 of their patch maximum."""
    patches = p[..., npt:]
    top = patches.amax(-1).float()
    top = torch.where(top > 0, top, torch.ones_like(top))
    u8 = torch.round(patches / top[..., None].double() * 255).clamp_(0, 255).to(torch.uint8)
    return u8.cpu().numpy(), top.cpu().numpy(), p[..., :npt].float().cpu().numpy()


def shown_error(got: torch.Tensor, exact: torch.Tensor, npt: int) -> torch.Tensor:
    """Largest ``|got - exact|`` over the patch keys in units of the exact row's patch maximum
    (what the map shows, scaled to its maximum): ``max_j |g_j - p_j| / max_j p_j``."""
    t = exact[..., npt:]
    return (got[..., npt:] - t).abs().amax(-1) / t.amax(-1).clamp_min(1e-300)


# --- the query-key view (AttentionViz) --------------------------------------------------------


def check_qk_embedding(method: str) -> None:
    """Refuse an unknown method, or t-SNE / UMAP without their library, before any pass."""
    from .errors import UnipError

    if method not in QK_EMBEDDINGS:
        raise UnipError(f"--qk-embedding {method!r}: expected one of {', '.join(QK_EMBEDDINGS)}")
    module = {"tsne": "openTSNE", "umap": "umap"}.get(method)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise UnipError(
                f"--qk-embedding {method} needs the {module} package, which is not installed: "
                "pip install 'unip-toolkit[embed]', or use --qk-embedding pca"
            )


def joint_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``q`` [..., n, d] (scaled by ``head_dim^-0.5``) and keys ``k`` [..., m, d] placed
    for one joint embedding (Yeh et al., "AttentionViz", VIS 2023, sec. 4.1): ``q c`` and ``k / c``
    with ``c^2`` = the keys' over the queries' mean distance from their centroid (a common spread),
    then the keys translated by ``t`` so their centroid is the queries'. Every logit becomes
    ``q_i . k_j + q_i . t c``: a constant per row, so every softmax row is unchanged."""
    q, k = q.double(), k.double()
    spread_q = (q - q.mean(-2, keepdim=True)).norm(dim=-1).mean(-1)[..., None, None]
    spread_k = (k - k.mean(-2, keepdim=True)).norm(dim=-1).mean(-1)[..., None, None]
    ok = (spread_q > 0) & (spread_k > 0)
    c = torch.where(ok, spread_k / torch.where(ok, spread_q, 1.0), 1.0).sqrt()
    q, k = q * c, k / c
    return q, k - k.mean(-2, keepdim=True) + q.mean(-2, keepdim=True)


def embed_2d(x: torch.Tensor, method: str = "pca") -> np.ndarray:
    """Points ``x`` [..., n, d] in 2-D, [..., n, 2]. PCA (the covariance's two leading
    eigenvectors, each one's largest loading made positive: deterministic), or t-SNE (openTSNE) /
    UMAP (umap-learn) with a fixed seed, one set of points at a time."""
    x = x.double()
    if method == "pca":
        xc = x - x.mean(-2, keepdim=True)
        _, vecs = torch.linalg.eigh(xc.transpose(-1, -2) @ xc)  # ascending eigenvalues
        axes = (
            vecs[..., -2:].flip(-1) if vecs.shape[-1] >= 2 else torch.cat([vecs, torch.zeros_like(vecs)], -1)
        )
        sign = torch.sign(axes.gather(-2, axes.abs().argmax(-2, keepdim=True)))
        return (xc @ (axes * torch.where(sign == 0, 1.0, sign))).numpy()
    if method not in QK_EMBEDDINGS:
        raise ValueError(f"embedding {method!r}: expected one of {', '.join(QK_EMBEDDINGS)}")
    flat = x.reshape(-1, *x.shape[-2:]).numpy()
    out = np.empty((*flat.shape[:2], 2))
    for i, arr in enumerate(flat):
        if method == "tsne":
            from openTSNE import TSNE

            out[i] = np.asarray(TSNE(n_components=2, random_state=0, n_jobs=1, verbose=False).fit(arr))
        else:
            import umap

            out[i] = umap.UMAP(n_components=2, random_state=0, n_jobs=1).fit_transform(arr)
    return out.reshape(*x.shape[:-1], 2)


def qk_view_tokens(grid: tuple[int, int], npt: int, stride: int) -> list[int]:
    """The tokens of the query-key view: every prefix token, then the patches of ``stride``."""
    return list(range(npt)) + [npt + p for p in query_indices(grid, stride)]


@dataclass
class QKView:
    """Every layer and head's joint 2-D embedding of the explored images' queries and keys:
    ``points[layer]`` float32 [heads, 2 (query, key), images, tokens, 2] over ``tokens`` (indices,
    prefix first), stored as uint16 of each head's box ``boxes[layer]`` [heads, 4] (x0, x1, y0, y1);
    ``points`` are the decoded values, what the page shows."""

    method: str
    tokens: list[int]
    stride: int
    points: list[np.ndarray]
    boxes: list[np.ndarray]
    u16: list[np.ndarray]
    seconds: float

    def keep_images(self, n: int) -> None:
        self.points = [p[:, :, :n] for p in self.points]
        self.u16 = [u[:, :, :n] for u in self.u16]


def qk_view(
    vectors: Sequence[tuple[torch.Tensor, torch.Tensor]], tokens: list[int], stride: int, method: str = "pca"
) -> QKView:
    """The query-key view of ``vectors``: per layer (q, k), each [images, heads, tokens, d], q
    already scaled by ``head_dim^-0.5``; each head embedded once for every image together."""
    import time

    t0 = time.perf_counter()
    groups = [list(vectors)] if len({tuple(q.shape) for q, _ in vectors}) == 1 else [[v] for v in vectors]
    points, boxes, u16 = [], [], []
    # One torch thread: the work is small d x d eigenproblems and light elementwise passes, no
    # faster with more threads and far slower with them on a CPU shared with other jobs (ViT-B/16's
    # 144 heads, 4 images, 2 cores at load 11: 13-26 s with two threads, 1.2-2.6 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for group in groups:
            _embed_group(group, method, points, boxes, u16)
    finally:
        torch.set_num_threads(threads)
    return QKView(method, tokens, stride, points, boxes, u16, time.perf_counter() - t0)


def _embed_group(
    group: Sequence[tuple[torch.Tensor, torch.Tensor]], method: str, points: list, boxes: list, u16: list
) -> None:
    """Layers of one shape embedded together (one batch of every layer's heads), appended per layer."""
    images, heads, n, d = group[0][0].shape
    # [layers x heads, images x tokens, d]: each head's points of every image, embedded together
    q, k = (torch.cat([v[i].transpose(0, 1).reshape(heads, images * n, d) for v in group]) for i in (0, 1))
    jq, jk = joint_qk(q, k)
    xy = embed_2d(torch.cat([jq, jk], 1), method).reshape(-1, 2, images, n, 2)
    lo, hi = xy.min((1, 2, 3)).astype(np.float32), xy.max((1, 2, 3)).astype(np.float32)  # [heads, 2]
    hi = np.where(hi > lo, hi, lo + 1)  # a flat axis: any span
    box = np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], 1)
    span = (hi.astype(np.float64) - lo)[:, None, None, None]
    u = np.round((xy - lo[:, None, None, None]) / span * 65535).clip(0, 65535).astype(np.uint16)
    pts = np.stack([decode_u16(u[h], box[h]) for h in range(len(u))])
    for layer in range(len(group)):
        at = slice(layer * heads, (layer + 1) * heads)
        points.append(pts[at])
        boxes.append(box[at])
        u16.append(u[at])


def decode_u16(u: np.ndarray, box: np.ndarray) -> np.ndarray:
    """uint16 points [..., 2] of box (x0, x1, y0, y1) as the page decodes them (float32)."""
    box = box.astype(np.float64)
    lo, span = np.array([box[0], box[2]]), np.array([box[1] - box[0], box[3] - box[2]])
    return (lo + u * span / 65535).astype(np.float32)


# --- recording during the analysis -------------------------------------------------------------


@dataclass
class QKLayer:
    """One image and layer as q (patch queries) and k (every token), one of the qk encodings."""

    q: Encoded  # [heads, patches, d]
    k: Encoded  # [heads, tokens, d]


@dataclass
class ExplorerData:
    """One model's explorer: the images as the model saw them, per recorded encoding and per image
    and layer the stored rows or q / k (every patch query; a query stride takes a subset), the logit
    bias per layer (q / k only), and each encoding's measured error per image, layer and query.
    :func:`choose_encodings` sets ``encoding`` and ``query_stride``: what the page gets."""

    plan: ExplorerPlan
    grid: tuple[int, int]
    num_prefix_tokens: int
    heads: list[int]
    images: list[np.ndarray]  # uint8 [H, W] grey or [H, W, 3]
    labels: list[str]
    layers: dict[str, list[list[RowsLayer | QKLayer]]]  # encoding -> [image][layer]
    bias: list[np.ndarray | None]  # [layer]: float32 [heads, patches, tokens]
    errors: dict[str, np.ndarray]  # encoding -> [images, layers, patches]: max over heads and the mean
    encoding: str = ""
    query_stride: int = 1
    reductions: list[str] = field(default_factory=list)
    qk: QKView | None = None  # the query-key view's 2-D points
    _texts: dict = field(default_factory=dict, repr=False)

    @property
    def depth(self) -> int:
        return len(self.bias)

    @property
    def queries(self) -> list[int]:
        return query_indices(self.grid, self.query_stride)

    def error(self, encoding: str | None = None, stride: int | None = None) -> float:
        """The largest measured error of any shown row (fraction of the row's maximum)."""
        e = self.errors[encoding or self.encoding]
        return float(e[:, :, query_indices(self.grid, stride or self.query_stride)].max())

    def keep_images(self, n: int) -> None:
        """Keep only the first ``n`` images (another model of the report has no more)."""
        if n >= len(self.images):
            return
        self.images, self.labels = self.images[:n], self.labels[:n]
        self.layers = {e: lays[:n] for e, lays in self.layers.items()}
        self.errors = {e: err[:n] for e, err in self.errors.items()}
        if self.qk is not None:
            self.qk.keep_images(n)
        self._texts.clear()
        self.plan.reductions.append(f"the first {n} images only: another model of the report has no more")

    def layer_error(self, image: int, layer: int) -> float:
        """The largest measured error of the shown rows of ``image`` at ``layer`` (1-based)."""
        return float(self.errors[self.encoding][image, layer - 1, self.queries].max())


def display_image(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """A normalised input [3, H, W] back as uint8 pixels: grey [H, W] when the channels agree."""
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:  # unknown normalisation: stretch to the image's own range
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        return np.ascontiguousarray(arr[..., 0])
    return np.ascontiguousarray(arr)


class ExplorerRecorder:
    """Keeps the first ``plan.images`` images' attention, layer by layer, as the streaming analysis
    computes it (:meth:`projections` is called once per layer and forward): every recorded encoding,
    and each one's error against the exact rows measured on the spot."""

    def __init__(
        self,
        plan: ExplorerPlan,
        shape: ModelShape,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        self.plan, self.shape, self.npt = plan, shape, shape.num_prefix_tokens
        self.mean, self.std = mean, std
        self.images_left = plan.images
        self._take, self._first = 0, 0
        self.images: list[np.ndarray] = []
        self.layers: dict[str, list[list]] = {e: [] for e in plan.encodings}
        self.errors: dict[str, list[list[np.ndarray]]] = {e: [] for e in plan.encodings}
        depth = len(shape.heads)
        self.bias: list[np.ndarray | None] = [None] * depth
        self._bias_seen = [False] * depth
        # the query-key view: q and k of its tokens, per layer and batch, until every image is in
        self.qk_stride = shape.qk_view_stride(plan.images)
        self.qk_tokens = qk_view_tokens(shape.grid, self.npt, self.qk_stride)
        self.qk_vectors: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(depth)]

    def start_batch(self, batch: torch.Tensor) -> None:
        self._take = min(batch.shape[0], self.images_left)
        self.images_left -= self._take
        self._first = len(self.images)
        for x in batch[: self._take]:
            self.images.append(display_image(x, self.mean, self.std))
            for e in self.layers:
                self.layers[e].append([])
                self.errors[e].append([])

    def projections(
        self,
        layer: int,
        q: torch.Tensor,
        scale: float,
        k: torch.Tensor,
        bias: Callable[[], torch.Tensor | None],
    ) -> None:
        if not self._take:  # every image to explore has been seen: nothing to compute
            return
        npt, take = self.npt, self._take
        tok = torch.tensor(self.qk_tokens, device=q.device)
        self.qk_vectors[layer].append(
            (q[:take, :, tok].float().mul(scale).cpu(), k[:take, :, tok].float().cpu())
        )
        q = q[:take, :, npt:].float() * scale  # patch queries, as the analysis' logits use them
        k = k[:take].float()
        if not self._bias_seen[layer]:
            b = bias()
            if b is not None:  # [heads, tokens, tokens]: BEiT's shared table has no batch dim
                b = b if b.dim() == 3 else b[0]
                self.bias[layer] = b[:, npt:].float().cpu().numpy()
            self._bias_seen[layer] = True
        b = None if self.bias[layer] is None else torch.from_numpy(self.bias[layer]).to(q.device).double()
        qk = {}
        for e in self.layers:
            if e == "rows-u8":
                continue
            eq, ek = encode_qk(q, e), encode_qk(k, e)
            if eq is None or ek is None:  # fp16 would overflow: not a candidate for this model
                self.errors[e][self._first].append(np.full(q.shape[2], np.inf))
                continue
            qk[e] = (eq, ek, torch.from_numpy(eq.decoded()).to(q.device).double(),
                     torch.from_numpy(ek.decoded()).to(q.device).double())  # fmt: skip
        rows = [] if "rows-u8" in self.layers else None
        errors = {e: [] for e in (*qk, *(["rows-u8"] if rows is not None else []))}
        kd = k.double().transpose(-1, -2)
        patches = q.shape[2]
        for q0 in range(0, patches, _QUERY_BLOCK):
            q1 = min(q0 + _QUERY_BLOCK, patches)
            exact = _with_mean(_softmax(q[:, :, q0:q1].double() @ kd, b, q0, q1))  # [b, heads + 1, blk, N]
            if rows is not None:
                u8, top, pre = encode_rows(exact, npt)
                rows.append((u8, top, pre))
                got = RowsLayer(u8, top, pre).full()
                errors["rows-u8"].append(
                    shown_error(torch.from_numpy(got).to(exact.device), exact, npt).amax(1)
                )
            for e, (_, _, dq, dk) in qk.items():
                got = _with_mean(_softmax(dq[:, :, q0:q1] @ dk.transpose(-1, -2), b, q0, q1))
                errors[e].append(shown_error(got, exact, npt).amax(1))
            del exact
        for j in range(take):
            i = self._first + j
            for e, (eq, ek, _, _) in qk.items():
                self.layers[e][i].append(QKLayer(eq.take(j, 0), ek.take(j, 0)))
            if rows is not None:
                self.layers["rows-u8"][i].append(
                    RowsLayer(*(np.concatenate([r[n][j] for r in rows], axis=1) for n in range(3)))
                )
            for e, parts in errors.items():
                self.errors[e][i].append(torch.cat([p[j] for p in parts]).float().cpu().numpy())

    def result(self, labels: Sequence[str]) -> ExplorerData:
        """The recorded data, with the encoding chosen for this model alone within the plan's budget."""
        usable = [e for e in self.layers if all(len(lays) == len(self.bias) for lays in self.layers[e])]
        data = ExplorerData(
            plan=self.plan,
            grid=self.shape.grid,
            num_prefix_tokens=self.npt,
            heads=list(self.shape.heads),
            images=self.images,
            labels=list(labels)[: len(self.images)],
            layers={e: self.layers[e] for e in usable},
            bias=self.bias,
            errors={e: np.array(self.errors[e], dtype=np.float32) for e in usable},
        )
        if all(self.qk_vectors):
            vectors = [tuple(torch.cat(part) for part in zip(*lay)) for lay in self.qk_vectors]
            data.qk = qk_view(vectors, self.qk_tokens, self.qk_stride, self.plan.qk_embedding)
        self.qk_vectors = []
        choose_encodings([data], self.plan.budget)
        return data


def _softmax(logits: torch.Tensor, bias: torch.Tensor | None, q0: int, q1: int) -> torch.Tensor:
    if bias is not None:
        logits = logits + bias[:, q0:q1]
    return logits.softmax(-1)


def _with_mean(p: torch.Tensor) -> torch.Tensor:
    """[b, heads, q, N] -> [b, heads + 1, q, N]: the heads' rows and their mean, as the page shows them."""
    return torch.cat([p, p.mean(1, keepdim=True)], 1)


# --- choosing what the page gets ---------------------------------------------------------------


def _raw_bytes(data: ExplorerData, encoding: str, stride: int) -> int:
    """Raw bytes of one option (before gzip): what sizes are estimated from."""
    queries = len(query_indices(data.grid, stride))
    tokens, npt = data.grid[0] * data.grid[1] + data.num_prefix_tokens, data.num_prefix_tokens
    per_image = 0
    for lay in data.layers[encoding][0]:
        if isinstance(lay, RowsLayer):
            per_image += lay.u8.shape[0] * queries * (tokens - npt + 4 + 4 * npt)
        else:
            h, _, d = lay.q.values.shape
            item = lay.q.values.itemsize
            per_image += h * d * (queries + tokens) * item + (
                0 if lay.q.scale is None else 4 * h * (queries + tokens)
            )
    bias = 0
    if not encoding.startswith("rows"):
        bias = sum(4 * b.shape[0] * queries * b.shape[2] for b in data.bias if b is not None)
    return len(data.images) * per_image + bias


def option_order(data: ExplorerData) -> list[tuple[str, int]]:
    """This model's (encoding, query stride) options, best first: rows within 1% of their maximum
    (:data:`EXACT`) before any that are not; then every query before a stride; then, within 1%, the
    smaller before the larger (both exact to the eye), beyond 1% the more exact first."""
    strides = []
    for s in range(1, max(data.grid) + 1):
        if not strides or len(query_indices(data.grid, s)) < len(query_indices(data.grid, strides[-1])):
            strides.append(s)
    options = [(e, s) for e in data.layers for s in strides if math.isfinite(data.error(e, s))]

    def key(o: tuple[str, int]) -> tuple:
        err = data.error(*o)
        return (err > EXACT, o[1], _raw_bytes(data, *o) if err <= EXACT else err)

    return sorted(options, key=key)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _describe(data: ExplorerData, best: tuple[str, int], budget: int) -> list[str]:
    notes = []
    err = data.error()
    if data.encoding != best[0]:
        notes.append(
            f"{ENCODING_NAMES[data.encoding]} (measured error {percent(err)} of the row maximum), not "
            f"{ENCODING_NAMES[best[0]]} ({percent(data.error(*best))}), to stay within the "
            f"{_mb(budget)} budget (--explore-budget)"
        )
    if data.query_stride > 1:
        s, kept, patches = data.query_stride, len(data.queries), data.grid[0] * data.grid[1]
        notes.append(
            f"query stride {s}: every {_ordinal(s)} patch row and column can be queried ({kept} of {patches} "
            f"queries), to stay within the {_mb(budget)} budget (--explore-budget)"
        )
    return notes


def choose_encodings(datas: Sequence[ExplorerData], budget: int | None = None) -> int:
    """Set every model's encoding and query stride so that all of them together fit ``budget``
    (gzip + base64 bytes), each as far up its :func:`option_order` as the others allow: while over,
    the model with the largest data steps down to its next smaller option. The images stay (they
    were decided before the pass, :func:`plan_images`). Returns the total bytes; each model's
    ``reductions`` say what was given up and what budget would keep the next better option."""
    budget = BUDGET_BYTES if budget is None else budget
    orders = [option_order(d) for d in datas]
    at = [0] * len(datas)

    def size(m: int, o: tuple[str, int], exact: bool = False) -> float:
        d = datas[m]
        if exact or o[1] == 1:
            return _text_bytes(d, *o)
        # a stride: the measured size of every query, scaled by the raw sizes (gzip once per encoding)
        return _text_bytes(d, o[0], 1) * _raw_bytes(d, *o) / _raw_bytes(d, o[0], 1)

    sizes = [size(m, orders[m][0]) for m in range(len(datas))]
    while True:
        while sum(sizes) > budget:
            movable = []
            for m, order in enumerate(orders):
                nxt = next((j for j in range(at[m] + 1, len(order)) if size(m, order[j]) < sizes[m]), None)
                if nxt is not None:
                    movable.append((sizes[m], m, nxt))
            if not movable:
                break
            _, m, nxt = max(movable)
            at[m], sizes[m] = nxt, size(m, orders[m][nxt])
        actual = [size(m, orders[m][at[m]], exact=True) for m in range(len(datas))]
        if sum(actual) <= budget or actual == sizes:
            break
        sizes = actual  # the estimate was low: go on from the measured sizes
    for m, d in enumerate(datas):
        d.encoding, d.query_stride = orders[m][at[m]]
        d.reductions = list(d.plan.reductions) + _describe(d, orders[m][0], budget)
        if at[m]:  # the budget that would keep the cheapest of the better options
            cost, better = min((size(m, o), o) for o in orders[m][: at[m]])
            need = math.ceil((sum(actual) - actual[m] + cost) / 1e5) / 10  # MB, rounded up
            stride = f" at query stride {better[1]}" if better[1] > 1 else ""
            d.reductions.append(
                f"--explore-budget {need:g} would keep {ENCODING_NAMES[better[0]]}{stride} "
                f"(measured error {percent(d.error(*better))})"
            )
        for k in [k for k in d._texts if k not in ((d.encoding, d.query_stride), "qk")]:
            del d._texts[k]  # the options not taken
        if sum(actual) > budget:
            d.reductions.append(
                f"all models together take {_mb(sum(actual))}, over the {_mb(budget)} budget even at "
                "the smallest encoding"
            )
    return int(sum(actual))


def percent(x: float) -> str:
    """A fraction as the page writes it: two significant digits, whole numbers from 10%."""
    v = 100 * x
    return f"{v:.0f}%" if v >= 10 else f"{v:#.2g}%"


def summary(data: ExplorerData) -> str:
    """One line: the encoding, its measured error, the size, and what was reduced."""
    line = (
        f"{ENCODING_NAMES[data.encoding]}, every shown row within {percent(data.error())} of its maximum "
        f"(measured), {_text_bytes(data, data.encoding, data.query_stride) / 1e6:.1f} MB"
    )
    if data.qk is not None:
        v = data.qk
        line += (
            f"; query-key view by {QK_EMBEDDING_NAMES[v.method]} ({v.seconds:.1f} s), "
            f"{qk_view_bytes(data) / 1e6:.1f} MB"
            + (f", every {v.stride}th patch row and column" if v.stride > 1 else "")
        )
    return "; ".join([line, *data.reductions])


# --- rows, as the browser computes them ------------------------------------------------------


def shown_rows(data: ExplorerData, image: int, layer: int, queries: Sequence[int]) -> np.ndarray:
    """The rows the page computes from the stored data for patch ``queries`` (stored ones) at
    ``layer`` (1-based): [heads + 1 (the mean last), queries, tokens (prefix first)], float64."""
    lay = data.layers[data.encoding][image][layer - 1]
    if isinstance(lay, RowsLayer):
        return lay.take(list(queries)).full()
    q = lay.q.decoded().astype(np.float64)[:, list(queries)]  # [heads, queries, d]
    k = lay.k.decoded().astype(np.float64)  # [heads, tokens, d]
    logits = q @ k.transpose(0, 2, 1)
    b = data.bias[layer - 1]
    if b is not None:
        logits = logits + b[:, list(queries)].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.concatenate([p, p.mean(0, keepdims=True)])


def full_row(data: ExplorerData, image: int, layer: int, head: int | str, query: int) -> np.ndarray | None:
    """The attention of patch query ``query`` over every token (prefix first) at ``layer``
    (1-based), ``head`` 0-based or ``"mean"``, as the page computes it from the stored data; None
    for a query the stride did not store."""
    if query not in data.queries:
        return None
    h = data.heads[layer - 1] if head == "mean" else int(head)
    return shown_rows(data, image, layer, [query])[h, 0]


def row(data: ExplorerData, image: int, layer: int, head: int | str, query: int) -> np.ndarray | None:
    """What the explorer displays: the attention of patch ``query`` over the patch keys (row-major),
    not renormalised (with :func:`prefix_share` it sums to 1, within the stored precision)."""
    p = full_row(data, image, layer, head, query)
    return None if p is None else p[data.num_prefix_tokens :]


def prefix_share(data: ExplorerData, image: int, layer: int, head: int | str, query: int) -> float | None:
    p = full_row(data, image, layer, head, query)
    return None if p is None else float(p[: data.num_prefix_tokens].sum())


def column(data: ExplorerData, image: int, layer: int, head: int | str, key: int) -> np.ndarray:
    """What "who looks here" displays: the attention each stored query patch (``data.queries``,
    row-major) gives to patch ``key``, not renormalised: column ``key`` of the stored rows."""
    npt = data.num_prefix_tokens
    return np.array([full_row(data, image, layer, head, q)[npt + key] for q in data.queries])


def qk_points(data: ExplorerData, layer: int, head: int) -> dict[str, np.ndarray]:
    """The query-key view's points of ``layer`` (1-based) and ``head`` (0-based) as the page shows
    them: ``queries`` and ``keys`` [images x tokens, 2], images in order, the view's tokens
    (``data.qk.tokens``, prefix first) in order within each."""
    pts = data.qk.points[layer - 1][head]
    return {"queries": pts[0].reshape(-1, 2), "keys": pts[1].reshape(-1, 2)}


def patch_brightness(img: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean grey value (0-255) of each patch of ``img`` (uint8 [H, W] or [H, W, 3]), row-major."""
    grey = img.astype(np.float64) if img.ndim == 2 else img.astype(np.float64).mean(-1)
    rows, cols = grid
    h, w = grey.shape[0] // rows, grey.shape[1] // cols
    cells = grey[: rows * h, : cols * w].reshape(rows, h, cols, w).mean((1, 3))
    return np.round(cells).astype(np.uint8).reshape(-1)


# --- the payload the page reads --------------------------------------------------------------


def _png_base64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Blob:
    """Sections packed into one buffer, each at a 4-byte aligned offset (typed arrays need it)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, arr: np.ndarray) -> int:
        off = self.size
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        pad = (-len(raw)) % 4
        self.parts.append(raw + b"\0" * pad)
        self.size += len(raw) + pad
        return off

    def text(self) -> str:
        """gzip, then base64: the browser reverses both (``DecompressionStream("gzip")``)."""
        return base64.b64encode(gzip.compress(b"".join(self.parts), compresslevel=6, mtime=0)).decode("ascii")


def _layer_entry(blob: _Blob, lay: RowsLayer | QKLayer, queries: list[int]) -> dict:
    if isinstance(lay, RowsLayer):
        r = lay.take(queries)
        return {"enc": "rows", "u8": blob.add(r.u8), "scale": blob.add(r.scale), "prefix": blob.add(r.prefix)}
    q = lay.q.take(queries)
    return {
        "enc": "qk",
        "dtype": q.dtype,
        "q": blob.add(q.values),
        "k": blob.add(lay.k.values),
        "qs": None if q.scale is None else blob.add(q.scale),
        "ks": None if lay.k.scale is None else blob.add(lay.k.scale),
        "d": int(q.values.shape[-1]),
    }


def _encoded(data: ExplorerData, encoding: str, stride: int) -> tuple[list[list[dict]], list[str], dict]:
    """Per image the layer entries and blob text of one option, and the bias (q / k only); cached."""
    key = (encoding, stride)
    if key not in data._texts:
        queries = query_indices(data.grid, stride)
        entries, texts = [], []
        for lays in data.layers[encoding]:
            blob = _Blob()
            entries.append([_layer_entry(blob, lay, queries) for lay in lays])
            texts.append(blob.text())
        bias: dict = {"text": None, "offsets": [None] * data.depth}
        if not encoding.startswith("rows") and any(b is not None for b in data.bias):
            blob, seen = _Blob(), {}
            for lay, b in enumerate(data.bias):
                if b is None:
                    continue
                b = np.ascontiguousarray(b[:, queries])
                digest = hashlib.sha256(b.tobytes()).hexdigest()  # BEiT's shared bias: stored once
                if digest not in seen:
                    seen[digest] = blob.add(b)
                bias["offsets"][lay] = seen[digest]
            bias["text"] = blob.text()
        data._texts[key] = (entries, texts, bias)
    return data._texts[key]


def _qk_encoded(data: ExplorerData) -> tuple[str, int, int]:
    """The query-key view's blob text (every head's box as fp32, then its points as uint16) and
    the two offsets; cached."""
    if "qk" not in data._texts:
        blob = _Blob()
        boxes = blob.add(np.concatenate(data.qk.boxes))  # [heads of every layer, 4]
        points = blob.add(np.concatenate(data.qk.u16))  # [heads of every layer, 2, images, tokens, 2]
        data._texts["qk"] = (blob.text(), boxes, points)
    return data._texts["qk"]


def qk_view_bytes(data: ExplorerData) -> int:
    """Bytes the query-key view's points take in the page (gzip + base64)."""
    return 0 if data.qk is None else len(_qk_encoded(data)[0])


def _text_bytes(data: ExplorerData, encoding: str, stride: int) -> int:
    _, texts, bias = _encoded(data, encoding, stride)
    return sum(len(t) for t in texts) + len(bias["text"] or "")


def _sink_labels(stats: dict) -> dict:
    """A head's sink statistics as the page labels them: the largest share one token receives, and
    which token that is ("cls", "reg0"... or a patch index)."""
    return {"sink": stats["sink_share"], "sinkToken": stats["sink_token"]}


def model_payload(
    analysis, thresholds, selected_layer: int | None = None, key: str = "m0"
) -> tuple[dict, dict[str, str]]:
    """The JSON description of one analysed model's explorer and its data blobs (key -> base64 text)."""
    from .patterns import classify

    data: ExplorerData = analysis.explorer
    heads = list(analysis.heads_per_layer)
    head_stats = []
    # the attention-sink statistic (issue 28), shown by the page where the analysis has it
    sinks = analysis.has_sinks() if hasattr(analysis, "has_sinks") else False
    for lay in range(analysis.depth):
        hn, hd = analysis.head_nmi[lay], analysis.head_distance[lay]
        head_stats.append(
            [
                {
                    "nmi": float(hn[:, h].mean()),
                    "dist": float(hd[:, h].mean()),
                    "pattern": classify(float(hn[:, h].mean()), thresholds),
                    **(_sink_labels(analysis.head_sinks(lay, h)) if sinks else {}),
                }
                for h in range(hn.shape[1])
            ]
        )
    entries, texts, bias = _encoded(data, data.encoding, data.query_stride)
    blobs: dict[str, str] = {}
    images = []
    for i, img in enumerate(data.images):
        name = f"{key}i{i}"
        blobs[name] = texts[i]
        layers = [{**e, "err": data.layer_error(i, lay + 1)} for lay, e in enumerate(entries[i])]
        images.append(
            {
                "label": data.labels[i] if i < len(data.labels) else f"image {i + 1}",
                "png": _png_base64(img),
                "blob": name,
                "layers": layers,
            }
        )
    bias_key = None
    if bias["text"] is not None:
        bias_key = f"{key}bias"
        blobs[bias_key] = bias["text"]
    qk = None
    if data.qk is not None:
        text, boxes, points = _qk_encoded(data)
        blobs[f"{key}qk"] = text
        qk = {
            "blob": f"{key}qk",
            "boxes": boxes,
            "points": points,
            "tokens": data.qk.tokens,
            "stride": data.qk.stride,
            "method": data.qk.method,
            "seconds": round(data.qk.seconds, 2),
            "bytes": len(text),
            "brightness": [patch_brightness(img, data.grid).tolist() for img in data.images],
        }
    meta = {
        "name": analysis.name,
        "grid": [int(g) for g in data.grid],
        "npt": int(data.num_prefix_tokens),
        "patch": int(analysis.patch_size),
        "depth": int(analysis.depth),
        "heads": heads,
        "queries": [int(q) for q in data.queries],
        "stride": int(data.query_stride),
        "encoding": data.encoding,
        "encodingName": ENCODING_NAMES[data.encoding],
        "error": data.error(),
        "bytes": _text_bytes(data, data.encoding, data.query_stride),
        "reductions": list(data.reductions),
        "selected": selected_layer,
        "headStats": head_stats,
        "bias": {"blob": bias_key, "offsets": bias["offsets"]},
        "images": images,
        "qk": qk,
    }
    return meta, blobs


def payload(
    analyses: Sequence, thresholds, selected: Mapping[str, int | None], budget: int | None = None
) -> tuple[dict, dict[str, str]]:
    """Description and blobs of every analysis that has explorer data: the same images for every
    model (the first as many as every model has), the encodings chosen for all of them together
    within ``budget`` (:func:`choose_encodings`)."""
    budget = BUDGET_BYTES if budget is None else budget
    shown = [a for a in analyses if getattr(a, "explorer", None) is not None]
    common = min((len(a.explorer.images) for a in shown), default=0)
    for a in shown:  # the same images for every model
        a.explorer.keep_images(common)
    total = choose_encodings([a.explorer for a in shown], budget)
    models, blobs = [], {}
    for j, res in enumerate(shown):
        meta, b = model_payload(res, thresholds, selected.get(res.name), key=f"m{j}")
        models.append(meta)
        blobs.update(b)
    return {"models": models, "colors": dict(PATTERN_COLORS), "budget": budget, "bytes": total}, blobs


# --- HTML ----------------------------------------------------------------------------------------


def static_text(name: str) -> str:
    """A file shipped in ``unip_analysis/static`` (the explorer's JS and CSS)."""
    return resources.files("unip_analysis").joinpath("static", name).read_text(encoding="utf-8")


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("unip_analysis", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
    )


def render_section(meta: dict, blobs: Mapping[str, str]) -> str:
    """The explorer as an HTML fragment for report.html: markup, inlined CSS and JS, the data."""
    js = static_text("explorer.js")
    if "</script" in js.lower():
        raise ValueError("explorer.js must not contain '</script'")
    return (
        _environment()
        .get_template("explorer.html.j2")
        .render(meta=meta, blobs=blobs, js=js, css=static_text("explorer.css"))
    )


def render_page(meta: dict, blobs: Mapping[str, str], title: str = "Attention explorer") -> str:
    """A whole standalone page holding only the explorer (Jupyter's static fallback)."""
    return (
        _environment()
        .get_template("explorer_page.html.j2")
        .render(title=title, section=render_section(meta, blobs))
    )
