"""Attention metrics as pure functions over [batch, heads, queries, keys] tensors.

Definitions follow Park et al. (ICLR 2023) as used by UNIP (method.md section 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-8  # added before renormalizing, as the reference analysis does


def patch_attention(
    attn: torch.Tensor, num_prefix_tokens: int, query_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Drop prefix tokens (cls, dist, registers) from rows and columns; renormalize rows.

    ``A'[q, k] = (A[q, k] + eps) / sum_k (A[q, k] + eps)`` over patch tokens only.
    ``query_rows`` (patch indices) keeps only those query rows, without copying the whole map.
    """
    if query_rows is None:
        a = attn[..., num_prefix_tokens:, num_prefix_tokens:] + EPS
    else:
        a = attn.index_select(-2, query_rows + num_prefix_tokens)[..., num_prefix_tokens:] + EPS
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


def layer_statistics_(
    attn: torch.Tensor, num_prefix_tokens: int, distance: torch.Tensor, chunks: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """NMI and mean attention distance per (batch, head) from one raw post-softmax map.

    Same values as ``nmi(patch_attention(attn))`` and ``attention_distance(...)``, but it
    CONSUMES ``attn`` (overwrites it in place) so that the streaming analysis never holds a
    second [B, H, N, N] buffer: the map is reduced in ``chunks`` blocks of query rows, so every
    temporary is at most about 1/``chunks`` of the map. Returns float64 tensors [B, H].
    """
    a = attn[..., num_prefix_tokens:, num_prefix_tokens:]  # view: rows and columns of patches
    n_q = a.shape[-2]
    d = distance.to(device=a.device, dtype=a.dtype)
    step = max(1, math.ceil(n_q / max(1, chunks)))
    p_k = torch.zeros(a.shape[:-2] + a.shape[-1:], dtype=torch.float64, device=a.device)
    cond_ent = torch.zeros(a.shape[:-2], dtype=torch.float64, device=a.device)
    dist = torch.zeros(a.shape[:-2], dtype=torch.float64, device=a.device)
    for q0 in range(0, n_q, step):
        rows = a[..., q0 : q0 + step, :]  # view into the map
        rows.add_(EPS)
        rows.div_(rows.sum(dim=-1, keepdim=True))
        dist += torch.einsum("bhqk,qk->bh", rows, d[q0 : q0 + step])
        p_k += rows.sum(dim=-2, dtype=torch.float64)
        cond_ent -= rows.xlogy_(rows).sum(dim=(-2, -1), dtype=torch.float64)
    p_k /= n_q
    h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
    nmi_ = (h_k - cond_ent / n_q) / torch.sqrt(h_k * math.log(n_q))
    return nmi_, dist / n_q


def patch_distance_matrix(grid: tuple[int, int], patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Euclidean distance in pixels between patch centres on a (rows, cols) grid: [N, N]."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    rows, cols = grid
    yy, xx = torch.meshgrid(torch.arange(rows) * ph, torch.arange(cols) * pw, indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], dim=1).double()
    return torch.cdist(pos, pos)


def attention_distance(attn: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Mean attention distance per (batch, head): mean_q sum_k A[q, k] * d(q, k), in pixels."""
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
