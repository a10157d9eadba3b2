"""The softmax of each block of attention logits, fused with the row statistics the analysis
reduces it to: one small C kernel (``csrc/attention_rows.c``), with the same quantities in
PyTorch ops where it cannot be built.

Per row q of a block (A the row's softmax, P patch keys k >= npt), :func:`softmax_rows` writes
``[sum_k A, sum_{k >= npt} A, sum_k A d(q, k), entropy term]`` (summed in fp64 from fp32 pieces
of 256 keys), the entropy term being
``sum_{k >= npt} (A + eps) log(A + eps)`` under Park et al.'s NMI and ``sum_k A log A`` under
UNIP's, and adds each block's column sums to ``cols`` [B, H, 2, tokens] fp64: the plain sum
over the rows, and the sum weighted by ``1 / (sum_{k >= npt} A + P eps)`` (Park) or by the row's
sum (UNIP). :class:`unip_analysis.metrics.StreamingStatistics` turns these into NMI, distance and
sinks.

Why a kernel and not torch.compile: at 4,097 tokens the analysis is the softmax plus an entropy
log and four sums over every probability, and in PyTorch ops each is a pass of its own over a
block of MiB (measured in benchmarks/RESULTS.md; torch.compile's code for the same function was
slower than PyTorch's own softmax on the project's CPU). The kernel keeps one row in cache for
all of them. It is built with the system's C compiler (``cc``, or ``$CC``) on first use, into
``$XDG_CACHE_HOME/unip/kernels`` (default ``~/.cache``), in about a second; torch's
cpp_extension would take a minute and need ninja. ``UNIP_KERNEL=torch`` skips it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "attention_rows.c"
DEFINITIONS = {"park": 1, "unip": 2}
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared"]


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: ``-march=native`` code from one CPU
    may not run on another sharing the cache."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unip" / "kernels"


def _compile(compiler: str, target: Path, flags: list[str] = _FLAGS) -> None:
    """Build the shared library at ``target`` (with OpenMP where the compiler has it), written
    to a temporary file and renamed, so that concurrent first uses never load half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for extra in (["-fopenmp"], []):
            cmd = [compiler, *flags, *extra, str(SOURCE), "-o", tmp, "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (with one warning saying why) where it
    cannot be built, or where ``UNIP_KERNEL=torch`` asks for the PyTorch ops."""
    if os.environ.get("UNIP_KERNEL", "c") == "torch":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    why = None
    if compiler is None:
        why = "no C compiler (cc) found"
    else:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode())
        target = cache_dir() / f"attention_rows-{key.hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _compile(compiler, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as err:
            why = f"{compiler} could not build {SOURCE.name}: {err}"
    if why is not None:
        warnings.warn(
            f"unip: the analysis' softmax kernel is not available ({why}); using PyTorch ops, "
            "the same results, about 1.4x slower at 1,024 px (set UNIP_KERNEL=torch to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _declare(lib)


@dataclass(frozen=True, eq=False)
class GridDistances:
    """Distances in pixels between the patches of a (rows, cols) grid, as one small table instead
    of a [P, P] matrix: ``d(q, k) = table[|yq - yk|, cols - 1 + xk - xq]`` (``table`` [rows,
    2 cols - 1], a view into storage with 8 elements to spare, which the kernel's copies may read).
    At 4,097 tokens that is 32 KiB instead of 64 MiB, or of a [rows, tokens] block of distances
    computed for every block of query rows and read again for every head."""

    table: torch.Tensor
    grid: tuple[int, int]

    @classmethod
    def build(cls, grid: tuple[int, int], patch_size: int | tuple[int, int], dtype, device) -> GridDistances:
        """``sqrt(dy^2 + dx^2)`` computed in ``dtype``: the offsets are whole pixels, so in fp32 the
        squares and their sum are exact (below 2^24) and the root is the fp64 distance rounded."""
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        rows, cols = grid
        dy = (torch.arange(rows, device=device) * ph).to(dtype)[:, None]
        dx = (torch.arange(-(cols - 1), cols, device=device) * pw).to(dtype)[None, :]
        storage = torch.zeros(rows * (2 * cols - 1) + 8, dtype=dtype, device=device)
        table = storage[: rows * (2 * cols - 1)].view(rows, 2 * cols - 1)
        table.copy_((dy * dy + dx * dx).sqrt_())
        return cls(table, (rows, cols))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def at(self, p0: int) -> DistanceRows:
        """The rows of a block whose first query is patch ``p0``."""
        return DistanceRows(self, p0)

    def fp32(self) -> GridDistances:
        """The table in fp32, contiguous, with its 8 elements to spare (what the kernel reads)."""
        t = self.table
        spare = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset() - t.numel()
        if t.dtype == torch.float32 and t.is_contiguous() and spare >= 8:
            return self
        storage = torch.zeros(self.table.numel() + 8, device=self.table.device)
        table = storage[: self.table.numel()].view(self.table.shape)
        table.copy_(self.table)
        return GridDistances(table, self.grid)

    def rows(self, p0: int, p1: int, num_prefix_tokens: int = 0, dtype=None) -> torch.Tensor:
        """The dense distances of query patches ``p0 : p1`` to every key [p1 - p0, prefix + P],
        0 for the prefix keys (the path without the kernel)."""
        rows, cols = self.grid
        q = torch.arange(p0, p1, device=self.table.device)
        k = torch.arange(rows * cols, device=self.table.device)
        dy = (q[:, None] // cols - k[None, :] // cols).abs()
        dx = k[None, :] % cols - q[:, None] % cols + (cols - 1)
        d = self.table[dy, dx]
        return torch.nn.functional.pad(d if dtype is None else d.to(dtype), (num_prefix_tokens, 0))

    def sums(self) -> torch.Tensor:
        """``sum_k d(q, k)`` per query patch q, fp64 [P], from the table in O(rows^2 cols)."""
        rows, cols = self.grid
        t = self.table.double()
        # window sums along x: s[dy, xq] = sum_xk table[dy, cols - 1 - xq + xk]
        c = torch.nn.functional.pad(t.cumsum(-1), (1, 0))
        start = torch.arange(cols - 1, -1, -1, device=t.device)
        s = c[:, start + cols] - c[:, start]
        dy = (
            torch.arange(rows, device=t.device)[:, None] - torch.arange(rows, device=t.device)[None, :]
        ).abs()
        return s[dy].sum(1).flatten()


@dataclass(frozen=True, eq=False)
class DistanceRows:
    """The distances of a block's queries, patches ``p0, p0 + 1, ...``, to every key."""

    grid: GridDistances
    p0: int


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the kernel's argument types declared."""
    fn = lib.unip_attention_rows
    c_long, ptr = ctypes.c_long, ctypes.c_void_p
    fn.argtypes = [ptr, c_long, c_long, c_long, c_long, ptr, c_long, c_long, ptr, c_long, c_long, ptr]
    fn.argtypes += [c_long] * 5
    fn.argtypes += [ctypes.c_double, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def _check(
    logits: torch.Tensor, d: DistanceRows | None, cols: torch.Tensor, h0: int, out: torch.Tensor, npt: int
) -> None:
    b, h, rows, n = logits.shape
    if (
        cols.dtype != torch.float64
        or cols.shape[0] != b
        or cols.shape[2:] != (2, n)
        or h0 + h > cols.shape[1]
    ):
        raise ValueError(
            f"cols: expected fp64 [{b}, >= {h0 + h}, 2, {n}], got {tuple(cols.shape)} {cols.dtype}"
        )
    if d is not None and (d.grid.num_patches != n - npt or not 0 <= d.p0 <= d.grid.num_patches - rows):
        raise ValueError(
            f"d: a grid of {n - npt} patches with rows {d.p0} to {d.p0 + rows} in it expected, "
            f"got {d.grid.grid[0]} x {d.grid.grid[1]} patches"
        )
    if out.dtype != torch.float64 or tuple(out.shape) != (b, h, rows, 4):
        raise ValueError(f"out: expected fp64 [{b}, {h}, {rows}, 4], got {tuple(out.shape)} {out.dtype}")


def kernel_applies(logits: torch.Tensor) -> bool:
    """Whether :func:`softmax_rows` runs the C kernel on this block (fp32 on the CPU, built)."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and library() is not None


def softmax_rows(
    logits: torch.Tensor,
    num_prefix_tokens: int,
    d: DistanceRows | None,
    cols: torch.Tensor,
    h0: int,
    definition: str,
    eps: float,
    out: torch.Tensor,
) -> None:
    """Replace ``logits`` [B, h, rows, tokens] by its softmax over the last dim, add the block's
    column sums to ``cols[:, h0 : h0 + h]`` and write the row statistics to ``out`` [B, h, rows, 4]
    fp64 (see the module's docstring; a view into a larger tensor will do). ``d``: the rows' distances
    to the patch keys (the block's rows are then patch queries ``d.p0, d.p0 + 1, ...``), or None
    (sum_k A d is then 0)."""
    _check(logits, d, cols, h0, out, num_prefix_tokens)
    fits = logits.is_contiguous() and cols.is_contiguous() and out.stride()[2:] == (4, 1)
    if not (fits and kernel_applies(logits)):
        logits.copy_(torch.softmax(logits, dim=-1))
        row_statistics(logits, num_prefix_tokens, d, cols, h0, definition, eps, out)
        return
    b, h, rows, n = logits.shape
    table, grid_w, p0 = None, 1, 0
    if d is not None:
        grid = d.grid.fp32()
        table, grid_w, p0 = grid.table.data_ptr(), grid.grid[1], d.p0
    s_b, s_h, s_c, _ = cols.stride()
    failed = library().unip_attention_rows(
        logits.data_ptr(), b * h, rows, n, num_prefix_tokens, table, grid_w, p0,
        out.data_ptr(), out.stride(0), out.stride(1), cols.data_ptr(), h, h0, s_b, s_h, s_c, eps,
        DEFINITIONS[definition], torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError("the analysis' softmax kernel could not allocate its scratch rows")


def row_statistics(
    probs: torch.Tensor,
    num_prefix_tokens: int,
    d: DistanceRows | None,
    cols: torch.Tensor,
    h0: int,
    definition: str,
    eps: float,
    out: torch.Tensor,
) -> None:
    """What :func:`softmax_rows` computes, in PyTorch ops, from rows that are already
    probabilities (any float dtype; sums within a row in that dtype, everything else fp64).
    ``probs`` is left as it was."""
    _check(probs, d, cols, h0, out, num_prefix_tokens)
    npt = num_prefix_tokens
    a = probs[..., npt:]
    total = probs.sum(dim=-1)
    mass = a.sum(dim=-1)
    if d is None:
        dist = torch.zeros_like(mass)
    else:
        rows = d.grid.rows(d.p0, d.p0 + probs.shape[-2], npt, probs.dtype)
        dist = torch.linalg.vecdot(probs, rows)
    if definition == "park":
        a = a + eps  # A + eps > 0: x log x needs no xlogy (several times slower)
        plogp = torch.log(a).mul_(a).sum(dim=-1)
        weight = 1.0 / (mass.double() + a.shape[-1] * eps)
    else:  # A log A with 0 log 0 = 0: the clamp only touches entries that A then makes 0 or < 1e-36
        plogp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log_().mul_(probs).sum(dim=-1)
        weight = total.double()
    hs = slice(h0, h0 + probs.shape[1])
    cols[:, hs, 0] += probs.sum(dim=-2)  # in the block's dtype, then fp64: an fp64 reduction is ~17x slower
    cols[:, hs, 1] += (weight.to(probs.dtype).unsqueeze(-2) @ probs).squeeze(-2)
    out.copy_(torch.stack([total, mass, dist, plogp], dim=-1))
