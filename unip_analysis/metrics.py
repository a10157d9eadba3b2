"""Attention metrics as pure functions over [batch, heads, queries, keys] tensors.

Two definitions of NMI (method.md section 1), named by :data:`NMI_DEFINITIONS`:

- ``park``: Park et al. (ICLR 2023), the reference notebook: patch tokens only, rows renormalised,
  p(q) uniform (:func:`nmi` on :func:`patch_attention`);
- ``unip``: the function UNIP's authors published (casiatao/UNIP issue 3): the layer's whole map,
  prefix tokens kept, rows as they are, p(q) and p(k) from row and column sums (:func:`nmi_unip`).

The attention distance follows Park et al. under either.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .kernels import GridDistances, row_statistics, softmax_rows

NMI_EPS = 1e-8  # added before renormalizing the patch rows for NMI, as the reference analysis does
DISTANCE_EPS = 1e-32  # ... and for the attention distance (method.md section 1)
EPS = NMI_EPS
NMI_DEFINITIONS = ("park", "unip")
# How figures and reports name each definition.
NMI_LABELS = {
    "park": "Park et al.'s NMI (patch tokens, rows renormalised)",
    "unip": "UNIP's published NMI (whole map, prefix tokens kept)",
}


def patch_attention(
    attn: torch.Tensor,
    num_prefix_tokens: int,
    query_rows: torch.Tensor | None = None,
    eps: float = NMI_EPS,
) -> torch.Tensor:
    """Drop prefix tokens (cls, dist, registers) from rows and columns; renormalize rows.

    ``A'[q, k] = (A[q, k] + eps) / sum_k (A[q, k] + eps)`` over patch tokens only; ``eps`` is
    1e-8 for NMI and 1e-32 for the attention distance (method.md section 1).
    ``query_rows`` (patch indices) keeps only those query rows, without copying the whole map.
    """
    if query_rows is None:
        a = attn[..., num_prefix_tokens:, num_prefix_tokens:] + eps
    else:
        a = attn.index_select(-2, query_rows + num_prefix_tokens)[..., num_prefix_tokens:] + eps
    return a / a.sum(dim=-1, keepdim=True)


def nmi(attn: torch.Tensor) -> torch.Tensor:
    """Normalized mutual information between queries and keys, per (batch, head).

    With p(q) = 1/N and p(k|q) = A[q, k]:
    ``I(Q;K) = sum_q sum_k p(q) p(k|q) log(p(k|q) / p(k))``, ``NMI = I / sqrt(H(Q) H(K))``.
    Computed as ``I = H(K) - mean_q H(A[q, :])``, which is the same sum rearranged and needs
    one pass over the map instead of materialising ``A / p(k)``.

    attn: [B, H, N, N] row-stochastic (see :func:`patch_attention`). Returns [B, H] float64.
    """
    n_q = attn.shape[-2]
    p_k = attn.mean(dim=-2, dtype=torch.float64)  # [B, H, K]
    h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
    h_k_given_q = -torch.special.xlogy(attn, attn).sum(dim=(-2, -1), dtype=torch.float64) / n_q
    mi = h_k - h_k_given_q
    h_q = math.log(n_q)
    return mi / torch.sqrt(h_k * h_q)


def nmi_unip(attn: torch.Tensor) -> torch.Tensor:
    """NMI as UNIP's authors published it (casiatao/UNIP issue 3), per (batch, head).

    ``attn`` is a layer's whole map [B, H, L, L] as the block computes it: prefix tokens kept,
    rows not renormalised. With R_q the row sums, C_k the column sums and T their total:
    ``p(q) = R_q / T``, ``p(k) = C_k / T``, ``joint = A[q, k] p(q)``,
    ``I = sum_qk joint log(joint / (p(q) p(k)))``, ``NMI = I / sqrt(H(Q) H(K))``.
    The published code uses log2 (the base cancels) and no epsilon: an entry that is exactly 0
    (an underflowed softmax) makes it NaN there; here it contributes 0, the limit of x log x.
    Returns [B, H] float64.
    """
    a = attn.double()
    rows, cols = a.sum(-1), a.sum(-2)  # [B, H, L]
    total = rows.sum(-1, keepdim=True)
    p_q, p_k = rows / total, cols / total
    h_q = -torch.special.xlogy(p_q, p_q).sum(-1)
    h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
    joint = a * p_q.unsqueeze(-1)
    # joint / (p(q) p(k)) = A / p(k); p(k) > 0 wherever A > 0.
    ratio = torch.where(a > 0, a / p_k.unsqueeze(-2), 1.0)
    mi = (joint * torch.log(ratio)).sum(dim=(-2, -1))
    return mi / torch.sqrt(h_q * h_k)


def check_nmi_definition(definition: str) -> str:
    """``definition`` if it names one of :data:`NMI_DEFINITIONS`, else ValueError."""
    if definition not in NMI_DEFINITIONS:
        raise ValueError(f"NMI definition {definition!r}: expected one of {', '.join(NMI_DEFINITIONS)}")
    return definition


def patch_centres(grid: tuple[int, int], patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(y, x) of every patch on a (rows, cols) grid in pixels, row-major: [rows * cols, 2] float64."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    rows, cols = grid
    yy, xx = torch.meshgrid(torch.arange(rows) * ph, torch.arange(cols) * pw, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=1).double()


@functools.lru_cache(maxsize=32)
def _grid_distances(
    grid: tuple[int, int], patch_size, dtype: torch.dtype, device: torch.device
) -> GridDistances:
    """One table per geometry, dtype and device, shared by every layer and batch (and by the
    head groups' threads, which only read it)."""
    return GridDistances.build(grid, patch_size, dtype, device)


@functools.lru_cache(maxsize=32)
def _distance_sums(grid: tuple[int, int], patch_size, device: torch.device) -> torch.Tensor:
    return _grid_distances(grid, patch_size, torch.float64, device).sums()


class StreamingStatistics:
    """NMI, mean attention distance and sink sums per (image, head) of one layer, accumulated
    over blocks of query rows so that the layer's map never has to exist (method.md section 1).

    Per patch query q, with A its post-softmax row over patch keys (prefix columns dropped):
    ``p(k|q) = (A + 1e-8) / Z_q`` for NMI and ``(A + 1e-32) / Z'_q`` for the distance. Each block
    is reduced to four sums per row (:func:`unip_analysis.kernels.softmax_rows`: the row's mass,
    its patch mass, ``sum_k A d`` and ``sum_k (A + eps) log(A + eps)``, kept per row, 32 bytes) and
    two sums per column, kept in fp64: ``sum_q A[q, k]`` (the sinks) and ``sum_q A[q, k] / Z_q``
    (p(k), the mean over ALL queries, needed before H(K) can be computed). :meth:`result` then gives
    ``NMI = (H(K) - mean_q H(K|q)) / sqrt(H(K) log N)`` and the mean distance in pixels.

    ``nmi_definition='unip'`` gives UNIP's published NMI instead (:func:`nmi_unip`, over the whole
    map: the prefix tokens' query rows are added too). p(k) needs every query's column before
    the mutual information can be formed; rearranged, with R_q, C_k, T as in :func:`nmi_unip` and
    ``W_k = sum_q R_q A[q, k]``, everything is a sum over rows (exact, no approximation)::

        T I    = sum_q R_q sum_k A log A  -  sum_k W_k log p(k)
        H(Q)   = log T - (1/T) sum_q R_q log R_q,      H(K) from p(k) = C_k / T

    kept in fp64 (T, sum_q R_q log R_q, sum_q R_q sum_k A log A, C_k and W_k). The distance and
    the sinks are the same under both.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        grid: tuple[int, int],
        patch_size: int | tuple[int, int],
        num_prefix_tokens: int,
        device: torch.device | str = "cpu",
        nmi_definition: str = "park",
    ):
        self.num_prefix_tokens = num_prefix_tokens
        self.nmi_definition = check_nmi_definition(nmi_definition)
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch_size = patch_size if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        self.device = torch.device(device)
        self.num_patches = n = grid[0] * grid[1]
        f64 = {"dtype": torch.float64, "device": device}
        tokens = n + num_prefix_tokens
        # per query row (prefix rows under 'unip' only): kernels.softmax_rows' four sums, fp64
        # (32 bytes a row, 8 / tokens of one layer's maps)
        self.row_sums = torch.zeros(batch, heads, tokens, 4, **f64)
        self.d_sum = _distance_sums(self.grid, self.patch_size, self.device)  # sum_k d(q, k) per patch query
        # column sums of the patch query rows: [sum_q A, sum_q A / Z_q (park) or R_q A (unip)]
        self.cols = torch.zeros(batch, heads, 2, tokens, **f64)
        self.unip = nmi_definition == "unip"
        if self.unip:  # the columns of the prefix rows
            self.prefix_cols = torch.zeros(batch, heads, 2, tokens, **f64)
        self.rows_per_head = [0] * heads
        self.prefix_rows_per_head = [0] * heads

    @property
    def rows_seen(self) -> int:
        """Patch query rows every head has received."""
        return min(self.rows_per_head)

    def distances(self, dtype: torch.dtype) -> GridDistances:
        """The grid's distances in ``dtype`` (a table of a few KiB)."""
        return _grid_distances(self.grid, self.patch_size, dtype, self.device)

    def _block(self, q0: int, rows: int, h0: int, heads: int, dtype: torch.dtype) -> tuple:
        """(the rows' distances or None, the column sums the block adds to, where its row sums go) for
        rows ``q0 : q0 + rows`` of heads ``h0 : h0 + heads``, all prefix or all patch queries;
        counts the rows."""
        npt = self.num_prefix_tokens
        counts = self.rows_per_head if q0 >= npt else self.prefix_rows_per_head
        if q0 >= npt:
            d, cols = self.distances(dtype).at(q0 - npt), self.cols
        elif not self.unip:
            raise ValueError(f"rows from {q0} include prefix queries (the first {npt} tokens)")
        elif q0 + rows > npt:
            raise ValueError(f"rows {q0} to {q0 + rows} mix prefix and patch queries")
        else:
            d, cols = None, self.prefix_cols
        for i in range(h0, h0 + heads):
            counts[i] += rows
        return d, cols, self.row_sums[:, h0 : h0 + heads, q0 : q0 + rows]

    def add_logits_(self, q0: int, logits: torch.Tensor, h0: int = 0) -> torch.Tensor:
        """Rows ``q0 : q0 + rows`` (token indices) of heads ``h0 : h0 + h``, as fp32 logits
        [B, h, rows, tokens] with prefix key columns included: replaced by their softmax while
        they are reduced (:func:`unip_analysis.kernels.softmax_rows`), and returned. The rows are
        all prefix queries (counted only under 'unip') or all patch queries."""
        d, cols, out = self._block(q0, logits.shape[-2], h0, logits.shape[1], logits.dtype)
        softmax_rows(logits, self.num_prefix_tokens, d, cols, h0, self.nmi_definition, NMI_EPS, out)
        return logits

    def add_(self, q0: int, probs: torch.Tensor, h0: int = 0) -> None:
        """Add rows ``q0 : q0 + rows`` (token indices) of heads ``h0 : h0 + h`` of the post-softmax
        map, [B, h, rows, tokens] in any float dtype, prefix key columns included; ``probs`` is left
        as it was. Prefix query rows are refused, except under the 'unip' definition, which counts them."""
        npt = self.num_prefix_tokens
        split = min(max(npt - q0, 0), probs.shape[-2]) if self.unip else 0
        for first, part in ((q0, probs[..., :split, :]), (q0 + split, probs[..., split:, :])):
            if part.shape[-2]:
                d, cols, out = self._block(first, part.shape[-2], h0, part.shape[1], part.dtype)
                row_statistics(part, npt, d, cols, h0, self.nmi_definition, NMI_EPS, out)

    def _check_complete(self) -> None:
        n, npt = self.num_patches, self.num_prefix_tokens
        if self.rows_seen != n or max(self.rows_per_head) != n:
            raise ValueError(f"statistics saw {self.rows_seen} patch query rows of {n}")
        if self.unip and set(self.prefix_rows_per_head) != {npt}:
            seen = self.rows_seen + min(self.prefix_rows_per_head)
            raise ValueError(f"UNIP NMI saw {seen} query rows of {n + npt}")

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(NMI, mean attention distance in pixels), each float64 [B, H]."""
        self._check_complete()
        n, npt = self.num_patches, self.num_prefix_tokens
        total, mass, dist, plogp = self.row_sums.unbind(-1)  # [B, H, tokens] each
        patch = slice(npt, None)
        mass = mass[..., patch]
        distance = ((dist[..., patch] + DISTANCE_EPS * self.d_sum) / (mass + n * DISTANCE_EPS)).sum(-1) / n
        if self.unip:
            t = total.sum(-1)
            cols = self.cols + self.prefix_cols
            p_k = cols[:, :, 0] / t.unsqueeze(-1)
            h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
            h_q = torch.log(t) - torch.special.xlogy(total, total).sum(-1) / t
            mi = ((total * plogp).sum(-1) - torch.special.xlogy(cols[:, :, 1], p_k).sum(-1)) / t
            return mi / torch.sqrt(h_q * h_k), distance
        z = mass + n * NMI_EPS  # normaliser of (A + 1e-8) over patch keys
        cond_entropy = (torch.log(z) - plogp[..., patch] / z).sum(-1)  # sum_q H(K|q)
        p_k = (self.cols[:, :, 1, npt:] + NMI_EPS * (1.0 / z).sum(-1, keepdim=True)) / n
        h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
        nmi_ = (h_k - cond_entropy / n) / torch.sqrt(h_k * math.log(n))
        return nmi_, distance

    def sinks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sink share, prefix share, sink token) of the same patch query rows (:func:`sink_result`)."""
        self._check_complete()
        return sink_result(self.cols[:, :, 0], self.num_prefix_tokens)


def map_statistics(
    attn: torch.Tensor,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    patch_size: int | tuple[int, int],
    rows: int | None = None,
    nmi_definition: str = "park",
) -> tuple[torch.Tensor, torch.Tensor]:
    """NMI and mean attention distance per (batch, head) of a whole post-softmax map [B, H, N, N],
    fed to :class:`StreamingStatistics` ``rows`` query rows at a time (default: all at once;
    under 'unip' the prefix tokens' rows too, as the first rows of the first block).
    The map is not modified. Returns float64 tensors [B, H]."""
    b, h, n, _ = attn.shape
    stats = StreamingStatistics(b, h, grid, patch_size, num_prefix_tokens, attn.device, nmi_definition)
    step = rows or n
    first = 0 if nmi_definition == "unip" else num_prefix_tokens
    for q0 in range(first, n, step):
        block = attn[:, :, q0 : q0 + step].clone()
        stats.add_(q0, block if block.dtype in (torch.float32, torch.float64) else block.float())
    return stats.result()


def patch_distance_matrix(grid: tuple[int, int], patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Euclidean distance in pixels between patch centres on a (rows, cols) grid: [N, N]."""
    pos = patch_centres(grid, patch_size)
    return torch.cdist(pos, pos)


def attention_distance(attn: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Mean attention distance per (batch, head): mean_q sum_k A[q, k] * d(q, k), in pixels.

    ``attn``: patch rows renormalized with 1e-32 (``patch_attention(..., eps=DISTANCE_EPS)``)."""
    d = distance.to(device=attn.device, dtype=attn.dtype)
    return (attn * d).sum(dim=(-2, -1), dtype=torch.float64) / attn.shape[-2]


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per image)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    if values.size == 1:
        return (float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# --- prototype maps, used to derive pattern thresholds and in tests -----------------


def local_window_attention(grid: tuple[int, int], radius: int = 1) -> torch.Tensor:
    """Each query attends uniformly to its (2r+1)^2 neighbourhood (clipped at borders): [N, N]."""
    rows, cols = grid
    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    near = ((y[:, None] - y[None, :]).abs() <= radius) & ((x[:, None] - x[None, :]).abs() <= radius)
    a = near.double()
    return a / a.sum(-1, keepdim=True)


def shared_attention(n: int) -> torch.Tensor:
    """Every query attends uniformly to every key (complete attention collapse): [N, N]."""
    return torch.full((n, n), 1.0 / n, dtype=torch.float64)


# --- attention sinks (method.md section 10) ----------------------------------------------------

SINK_DOMINATED = 0.5  # a layer whose sink share reaches this sends half its attention to one token


def sink_result(
    received: torch.Tensor, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a layer's attention goes (method.md section 10; Darcet et al., "Vision Transformers
    Need Registers", ICLR 2024), from ``received = sum_q A[q, j]`` over every patch query q
    [B, H, tokens] fp64 (full softmax rows, prefix keys included). With r_j = received_j / patches,
    per (image, head): ``sink share = max_j r_j``, ``prefix share = sum_{j < npt} r_j`` and the
    sink token ``argmax_j r_j`` (a token index, prefix tokens first)."""
    r = received / (received.shape[-1] - num_prefix_tokens)
    share, token = r.max(dim=-1)
    return share, r[..., :num_prefix_tokens].sum(-1), token


def sink_statistics(
    attn: torch.Tensor, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sink_result` of a whole post-softmax map [B, H, N, N] (its patch query rows)."""
    return sink_result(attn[:, :, num_prefix_tokens:].sum(dim=-2, dtype=torch.float64), num_prefix_tokens)
