"""The attention explorer: every layer, head and query of a few images, interactive and offline.

What is stored is not the attention maps but what they are computed from: per explored image and
layer, each head's query vectors of the patch tokens (already scaled by ``head_dim^-0.5``) and key
vectors of every token, after q/k norm and rotary embedding, plus the block's additive logit bias
where it has one (BEiT's relative position bias; image-independent, stored once per layer). The
browser computes a row on demand, ``softmax(q . k_j + bias_j)`` over all tokens, as the analysis
does: exact up to the stored precision, and N x d per head instead of N^2.

Two precisions (docs/analysis.md, "Attention explorer", states the error bounds):

- ``fp16``: every value rounded to half precision, ``|x - x^| <= 2^-11 |x|``;
- ``int8``: each (token, head) vector as int8 times one fp32 scale ``s = max|x| / 127``,
  ``|x - x^| <= s / 2``.

:func:`plan_explorer` takes fp16 when the encoded data fits the per-model budget, then int8, then
fewer images, then a query stride, and records each reduction so the report can say so. The data
are recorded during the analysis' own forward pass (:class:`ExplorerRecorder`, fed by
:class:`unip_analysis.analyze.LayerObserver`): nothing but the explored images' q and k is kept.

:func:`row` is the same computation in numpy (what the browser displays, to float64 rounding);
:func:`explore` shows the explorer in Jupyter (anywidget), or as static HTML where widgets are
unavailable.
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
# Encoded bytes (after base64) one model's explorer data may take in report.html.
BUDGET_BYTES = 24 * 2**20
PRECISIONS = ("fp16", "int8")
_INT8_MAX = 127
_FP16_MAX = 65504.0
_FP16_REL = 2.0**-11  # round to nearest: |x - fp16(x)| <= 2^-11 |x| in the normal range
_FP16_ABS = 2.0**-25  # ... and half the smallest subnormal step below it
_F32_REL = 2.0**-23  # int8: x / s and int * s (the browser's Float32Array) are each rounded in fp32


# --- what to store ---------------------------------------------------------------------------


def query_indices(grid: tuple[int, int], stride: int = 1) -> list[int]:
    """Patch indices (row-major) of the stored queries: every ``stride``-th row and column."""
    rows, cols = grid
    return [r * cols + c for r in range(0, rows, stride) for c in range(0, cols, stride)]


@dataclass
class ExplorerPlan:
    """What one model's explorer stores: precision, query stride, how many images, and why."""

    precision: str
    query_stride: int
    images: int
    reductions: list[str] = field(default_factory=list)
    estimated_bytes: int = 0


def encoded_bytes(
    precision: str,
    images: int,
    heads: Sequence[int],
    head_dims: Sequence[int],
    tokens: int,
    queries: int,
) -> int:
    """Upper estimate of the base64 text one model's q and k take (no credit for compression)."""
    per_value = 2 if precision == "fp16" else 1
    raw = 0
    for h, d in zip(heads, head_dims):
        raw += h * d * (queries + tokens) * per_value
        if precision == "int8":
            raw += 4 * h * (queries + tokens)  # one fp32 scale per (token, head)
    return math.ceil(images * raw * 4 / 3)


def plan_explorer(
    images: int,
    heads: Sequence[int],
    head_dims: Sequence[int],
    grid: tuple[int, int],
    num_prefix_tokens: int,
    budget: int | None = None,
) -> ExplorerPlan:
    """The most exact data that fit ``budget``: fp16, else int8, else fewer images, else a query
    stride (every s-th patch row and column is a stored query). ``reductions`` says what was given up."""
    budget = BUDGET_BYTES if budget is None else budget
    tokens = grid[0] * grid[1] + num_prefix_tokens
    patches = grid[0] * grid[1]

    def size(precision: str, n: int, stride: int) -> int:
        return encoded_bytes(precision, n, heads, head_dims, tokens, len(query_indices(grid, stride)))

    mib = 2**20
    if size("fp16", images, 1) <= budget:
        return ExplorerPlan("fp16", 1, images, [], size("fp16", images, 1))
    notes = [
        f"q and k stored as int8 with a scale per token and head, not fp16 "
        f"({size('fp16', images, 1) / mib:.1f} MiB would exceed the {budget / mib:.0f} MiB budget)"
    ]
    n = images
    while n > 1 and size("int8", n, 1) > budget:
        n -= 1
    if n < images:
        notes.append(f"{n} of the {images} images asked for (--explore-images), to stay within the budget")
    stride = 1
    while size("int8", n, stride) > budget and stride < max(grid):
        stride += 1
    if stride > 1:
        kept = len(query_indices(grid, stride))
        notes.append(
            f"query stride {stride}: every {stride}th patch row and column can be queried "
            f"({kept} of {patches} queries), to stay within the budget"
        )
    if size("int8", n, stride) > budget:  # every row needs every key: k alone is too large
        notes.append(
            f"still {size('int8', n, stride) / mib:.0f} MiB, over the {budget / mib:.0f} MiB budget: the keys "
            "of every token are needed for any row"
        )
    return ExplorerPlan("int8", stride, n, notes, size("int8", n, stride))


# --- encoding --------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One tensor [heads, tokens, d] as stored: ``values`` (float16, or int8 with fp32 ``scale``
    [heads, tokens]), and what the browser decodes it to (``decoded``, float32)."""

    values: np.ndarray
    scale: np.ndarray | None

    @property
    def dtype(self) -> str:
        return "f16" if self.values.dtype == np.float16 else "i8"

    def take(self, i: int) -> Encoded:
        """Image ``i`` of a batch encoded at once."""
        return Encoded(self.values[i], None if self.scale is None else self.scale[i])

    def decoded(self) -> np.ndarray:
        if self.scale is None:
            return self.values.astype(np.float32)
        return self.values.astype(np.float32) * self.scale[..., None]  # fp32 product, as Float32Array

    def error(self) -> np.ndarray:
        """Bound on ``|x - decoded|`` per element (docs/analysis.md)."""
        dec = np.abs(self.decoded().astype(np.float64))
        if self.scale is None:
            return dec * (_FP16_REL / (1 - _FP16_REL)) + _FP16_ABS
        return self.scale.astype(np.float64)[..., None] / 2 + dec * _F32_REL


def encode(x: torch.Tensor, precision: str) -> Encoded:
    """``x`` [..., tokens, d] fp32 in the stored precision; fp16 that would overflow falls back to int8."""
    x = x.contiguous()
    if precision == "fp16" and float(x.abs().max()) < _FP16_MAX:
        return Encoded(x.to(torch.float16).cpu().numpy(), None)
    scale = x.abs().amax(-1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale[..., None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return Encoded(q.cpu().numpy(), scale.cpu().numpy().astype(np.float32))


def logit_error_bound(q: Encoded, k: Encoded) -> np.ndarray:
    """Max over keys of the bound on ``|q.k - q^.k^|`` per (head, query):
    ``sum_d dq_d |k^_d| + |q^_d| dk_d + dq_d dk_d`` with d* the per-element bounds
    (= ``dq . |k^| + (|q^| + dq) . dk``; fp32 sums of non-negative terms, rounded up by 1e-5)."""
    qd, kd = torch.from_numpy(np.abs(q.decoded())), torch.from_numpy(np.abs(k.decoded()))
    qe = torch.from_numpy(q.error().astype(np.float32))
    ke = torch.from_numpy(k.error().astype(np.float32))
    eps = qe @ kd.transpose(1, 2) + (qd + qe) @ ke.transpose(1, 2)
    return (eps.amax(-1) * (1 + 1e-5)).double().numpy()


# --- recording during the analysis -------------------------------------------------------------


@dataclass
class ExplorerData:
    """One model's explorer data: per explored image and layer the encoded q (stored patch queries)
    and k (every token), the images as the model saw them, and the bias per layer."""

    plan: ExplorerPlan
    grid: tuple[int, int]
    num_prefix_tokens: int
    queries: list[int]
    images: list[np.ndarray]  # uint8 [H, W] grey or [H, W, 3]
    labels: list[str]
    q: list[list[Encoded]]  # [image][layer]: [heads, queries, d]
    k: list[list[Encoded]]  # [image][layer]: [heads, tokens, d]
    bias: list[np.ndarray | None]  # [layer]: float32 [heads, queries, tokens]
    _logit_error: dict = field(default_factory=dict, repr=False)

    @property
    def depth(self) -> int:
        return len(self.bias)

    def logit_error(self, image: int, layer: int) -> np.ndarray:
        """Bound on the logit error per (head, stored query) at ``layer`` (1-based), max over keys;
        computed when first asked (the report), not during the analysis pass."""
        key = (image, layer)
        if key not in self._logit_error:
            self._logit_error[key] = logit_error_bound(self.q[image][layer - 1], self.k[image][layer - 1])
        return self._logit_error[key]


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
    """Keeps the encoded q and k of the first ``plan.images`` images, layer by layer, as the
    streaming analysis computes them (:meth:`projections` is called once per layer and forward)."""

    def __init__(
        self,
        plan: ExplorerPlan,
        depth: int,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        self.plan, self.grid, self.npt = plan, grid, num_prefix_tokens
        self.mean, self.std = mean, std
        self.queries = query_indices(grid, plan.query_stride)
        self.images_left = plan.images
        self._take, self._first = 0, 0
        self.images: list[np.ndarray] = []
        self.q: list[list[Encoded]] = []
        self.k: list[list[Encoded]] = []
        self.bias: list[np.ndarray | None] = [None] * depth
        self._bias_seen = [False] * depth

    def start_batch(self, batch: torch.Tensor) -> None:
        self._take = min(batch.shape[0], self.images_left)
        self.images_left -= self._take
        self._first = len(self.images)
        for x in batch[: self._take]:
            self.images.append(display_image(x, self.mean, self.std))
            self.q.append([])
            self.k.append([])

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
        q = q[: self._take].float() * scale  # as the analysis' logits: (q.float() * scale) @ k^T
        rows = torch.tensor(self.queries, device=q.device) + self.npt
        if not self._bias_seen[layer]:
            b = bias()
            if b is not None:
                b = (
                    b if b.dim() == 3 else b[0]
                )  # [heads, tokens, tokens]: BEiT's shared table has no batch dim
                self.bias[layer] = b.index_select(1, rows).float().cpu().numpy()
            self._bias_seen[layer] = True
        # the whole batch's explored images at once: one encoding per layer and forward
        qe = encode(q.index_select(2, rows), self.plan.precision)
        ke = encode(k[: self._take], self.plan.precision)
        for j in range(self._take):
            self.q[self._first + j].append(qe.take(j))
            self.k[self._first + j].append(ke.take(j))

    def result(self, labels: Sequence[str]) -> ExplorerData:
        return ExplorerData(
            plan=self.plan,
            grid=self.grid,
            num_prefix_tokens=self.npt,
            queries=self.queries,
            images=self.images,
            labels=list(labels)[: len(self.images)],
            q=self.q,
            k=self.k,
            bias=self.bias,
        )


# --- rows, as the browser computes them ------------------------------------------------------


def full_row(data: ExplorerData, image: int, layer: int, head: int | str, query: int) -> np.ndarray | None:
    """Softmax over every token (prefix first) of patch query ``query`` at ``layer`` (1-based),
    ``head`` 0-based or ``"mean"``; None for a query the stride did not store."""
    if query not in data.queries:
        return None
    qi = data.queries.index(query)
    q = data.q[image][layer - 1].decoded().astype(np.float64)[:, qi]  # [heads, d]
    k = data.k[image][layer - 1].decoded().astype(np.float64)  # [heads, tokens, d]
    logits = np.einsum("hd,hnd->hn", q, k)
    b = data.bias[layer - 1]
    if b is not None:
        logits = logits + b[:, qi].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p.mean(0) if head == "mean" else p[int(head)]


def row(data: ExplorerData, image: int, layer: int, head: int | str, query: int) -> np.ndarray | None:
    """What the explorer displays: the attention of patch ``query`` over the patch keys (row-major),
    not renormalised (its sum plus :func:`prefix_share` is 1)."""
    p = full_row(data, image, layer, head, query)
    return None if p is None else p[data.num_prefix_tokens :]


def prefix_share(data: ExplorerData, image: int, layer: int, head: int | str, query: int) -> float | None:
    p = full_row(data, image, layer, head, query)
    return None if p is None else float(p[: data.num_prefix_tokens].sum())


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


def model_payload(
    analysis, thresholds, selected_layer: int | None = None, key: str = "m0"
) -> tuple[dict, dict[str, str]]:
    """The JSON description of one analysed model's explorer and its data blobs (key -> base64 text)."""
    from .patterns import classify

    data: ExplorerData = analysis.explorer
    heads = list(analysis.heads_per_layer)
    head_stats = []
    for lay in range(analysis.depth):
        hn, hd = analysis.head_nmi[lay], analysis.head_distance[lay]
        head_stats.append(
            [
                {
                    "nmi": float(hn[:, h].mean()),
                    "dist": float(hd[:, h].mean()),
                    "pattern": classify(float(hn[:, h].mean()), thresholds),
                }
                for h in range(hn.shape[1])
            ]
        )
    blobs: dict[str, str] = {}
    images = []
    for i, img in enumerate(data.images):
        blob = _Blob()
        layers = []
        for lay in range(data.depth):
            q, k = data.q[i][lay], data.k[i][lay]
            entry = {
                "dtype": q.dtype,
                "q": blob.add(q.values),
                "k": blob.add(k.values),
                "kdtype": k.dtype,
                "qs": None if q.scale is None else blob.add(q.scale),
                "ks": None if k.scale is None else blob.add(k.scale),
                "d": int(q.values.shape[-1]),
                "eps": float(data.logit_error(i, lay + 1).max()),
            }
            layers.append(entry)
        name = f"{key}i{i}"
        blobs[name] = blob.text()
        images.append(
            {
                "label": data.labels[i] if i < len(data.labels) else f"image {i + 1}",
                "png": _png_base64(img),
                "blob": name,
                "layers": layers,
            }
        )
    bias_blob, bias_offsets, seen = _Blob(), [], {}
    for b in data.bias:
        if b is None:
            bias_offsets.append(None)
            continue
        digest = hashlib.sha256(b.tobytes()).hexdigest()  # BEiT's shared bias: stored once
        if digest not in seen:
            seen[digest] = bias_blob.add(b.astype(np.float32))
        bias_offsets.append(seen[digest])
    bias_key = None
    if any(o is not None for o in bias_offsets):
        bias_key = f"{key}bias"
        blobs[bias_key] = bias_blob.text()
    meta = {
        "name": analysis.name,
        "grid": [int(g) for g in data.grid],
        "npt": int(data.num_prefix_tokens),
        "patch": int(analysis.patch_size),
        "depth": int(analysis.depth),
        "heads": heads,
        "queries": [int(q) for q in data.queries],
        "stride": int(data.plan.query_stride),
        "precision": data.plan.precision,
        "reductions": list(data.plan.reductions),
        "selected": selected_layer,
        "headStats": head_stats,
        "bias": {"blob": bias_key, "offsets": bias_offsets},
        "images": images,
    }
    return meta, blobs


def payload(
    analyses: Sequence, thresholds, selected: Mapping[str, int | None]
) -> tuple[dict, dict[str, str]]:
    """Description and blobs of every analysis that has explorer data."""

    models, blobs = [], {}
    for j, res in enumerate(a for a in analyses if getattr(a, "explorer", None) is not None):
        meta, b = model_payload(res, thresholds, selected.get(res.name), key=f"m{j}")
        models.append(meta)
        blobs.update(b)
    return {"models": models, "colors": dict(PATTERN_COLORS)}, blobs


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
