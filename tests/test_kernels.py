"""The analysis' fused softmax kernel (unip_analysis.kernels) against the same quantities in PyTorch
ops in fp64, on logits that look trained: tens in size, a sink column, rows whose far keys underflow."""

from __future__ import annotations

import copy
import math
import os
import platform
import shutil
import warnings

import numpy as np
import pytest
import torch
from attention_reference import timm_explicit_attention
from trained_like import trained_like

from unip_analysis import analyze, attention, kernels, metrics
from unip_analysis.metrics import NMI_EPS

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


def trained_logits(b: int, h: int, rows: int, n: int, npt: int, seed: int = 0) -> torch.Tensor:
    """Logits in the tens, the first key a sink in half the rows, a few rows 100 wide (most keys
    underflow to exactly 0 in fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, rows, n, generator=g) * 4
    x[..., 0] += 25 * (torch.rand(b, h, rows, generator=g) > 0.5)
    x[..., ::7, :] *= 12
    x[..., npt : npt + 3] += 8  # a few patch keys everyone looks at
    return x


def grid_rows(n: int, npt: int, rows: int, p0: int = 3) -> kernels.DistanceRows:
    """Distances for a block of ``rows`` patch queries from patch ``p0`` on: the most square grid
    of ``n - npt`` patches, patches 16 px high and 12 wide (so that x and y cannot swap unseen)."""
    patches = n - npt
    gh = max(i for i in range(1, math.isqrt(patches) + 1) if patches % i == 0)
    grid = kernels.GridDistances.build((gh, patches // gh), (16, 12), torch.float32, "cpu")
    return grid.at(min(p0, patches - rows))


def kernel(x, npt, d, cols, h0, definition):
    """softmax_rows, returning the row sums."""
    out = torch.full((*x.shape[:3], 4), float("nan"), dtype=torch.float64)
    kernels.softmax_rows(x, npt, d, cols, h0, definition, NMI_EPS, out)
    return out


def torch_rows(probs, npt, d, cols, h0, definition):
    """row_statistics, returning the row sums."""
    out = torch.full((*probs.shape[:3], 4), float("nan"), dtype=torch.float64)
    kernels.row_statistics(probs, npt, d, cols, h0, definition, NMI_EPS, out)
    return out


def reference(logits, npt, d, definition, h0, heads_total):
    """softmax_rows in PyTorch ops on fp64 logits."""
    b, h, _, n = logits.shape
    cols = torch.zeros(b, heads_total, 2, n, dtype=torch.float64)
    probs = torch.softmax(logits.double(), dim=-1)
    stats = torch_rows(probs, npt, d, cols, h0, definition)
    return probs, stats, cols


@needs_cc
@pytest.mark.parametrize("definition", ["park", "unip"])
@pytest.mark.parametrize("npt,n", [(1, 197), (0, 64), (5, 205), (1, 1025)])
def test_kernel_equals_fp64_reference_within_fp32_rounding(definition, npt, n):
    assert kernels.library() is not None
    b, h, rows, h0, heads_total = 2, 3, 37, 1, 5
    logits = trained_logits(b, h, rows, n, npt)
    d = grid_rows(n, npt, rows)
    want_p, want_s, want_c = reference(logits, npt, d, definition, h0, heads_total)
    x = logits.clone()
    cols = torch.zeros(b, heads_total, 2, n, dtype=torch.float64)
    assert kernels.kernel_applies(x)
    stats = kernel(x, npt, d, cols, h0, definition)
    assert not torch.equal(x, torch.softmax(logits, -1)), "the kernel rounds unlike PyTorch: it ran"
    torch.testing.assert_close(x.double(), want_p, rtol=2e-6, atol=1e-12)
    assert (x == 0).any(), "some probabilities underflow in fp32: the test covers them"
    # row sums, patch mass, sum A d: fp32 summation of n terms
    torch.testing.assert_close(stats[..., :2], want_s[..., :2], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats[..., 2], want_s[..., 2], rtol=2e-6, atol=1e-6)
    # the entropy terms: at most a few units of fp32 rounding of the row's sum of |p log p|
    torch.testing.assert_close(stats[..., 3], want_s[..., 3], rtol=0, atol=2e-6)
    torch.testing.assert_close(cols, want_c, rtol=2e-6, atol=1e-9)
    assert cols[:, :h0].abs().sum() == 0 and cols[:, h0 + h :].abs().sum() == 0  # only its heads


@needs_cc
def test_kernel_is_as_accurate_as_pytorch_fp32_at_4097_tokens():
    """Against fp64, the kernel's probabilities and entropy terms are no worse than PyTorch's own
    fp32 softmax and log (the path without a compiler)."""
    npt, n = 1, 4097
    logits = trained_logits(1, 1, 16, n, npt, seed=3)
    d = grid_rows(n, npt, 16, p0=2000)
    for definition in ("park", "unip"):
        want_p, want_s, _ = reference(logits, npt, d, definition, 0, 1)
        x = logits.clone()
        got = kernel(x, npt, d, torch.zeros(1, 1, 2, n, dtype=torch.float64), 0, definition)
        p32 = torch.softmax(logits, -1)
        eager = torch_rows(p32, npt, d, torch.zeros(1, 1, 2, n, dtype=torch.float64), 0, definition)
        for i in range(4):
            ours = (got[..., i] - want_s[..., i]).abs().max().item()
            theirs = (eager[..., i] - want_s[..., i]).abs().max().item()
            assert ours <= 2 * theirs + 1e-9, (definition, i, ours, theirs)
        assert (x.double() - want_p).abs().max() <= 2 * (p32.double() - want_p).abs().max()


@needs_cc
@pytest.mark.parametrize("n", [197, 4097])
def test_entropy_term_from_the_logits_is_as_accurate_as_the_log(n):
    """Rows whose every probability is at least the kernel's TAU (1e-7) take (A + eps) log(A + eps)
    from t - log s and a series in eps / A instead of a log; rows just above and just below TAU, and
    rows of an untrained model (logits near 0), against fp64 and against PyTorch's fp32 ops."""
    npt, rows = 1, 24
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 1, rows, n, generator=g) * 0.3  # an untrained model's rows
    # row r: one key pushed down until its probability is about 10**(-5 - r / 4) (1e-5 to 1e-11)
    for r in range(8, rows):
        target = 10 ** (-5 - (r - 8) / 2.5)
        logits[0, 0, r, npt + r] = math.log(target * n)
    # row 7: every key but ten at about 1.2e-7, where eps^2 / (2 A) adds up to ~1e-6 over a row
    logits[0, 0, 7] = 0.0
    logits[0, 0, 7, -10:] = math.log((1 - 1.2e-7 * (n - 10)) / (10 * 1.2e-7))
    probs = torch.softmax(logits.double(), -1)
    smallest = probs[0, 0].min(-1).values
    assert (smallest >= 1e-7).sum() >= 12 and (smallest < 1e-7).sum() >= 6  # both sides of TAU
    d = grid_rows(n, npt, rows, p0=n)  # the grid's last rows
    for definition in ("park", "unip"):
        want_p, want_s, _ = reference(logits, npt, d, definition, 0, 1)
        x = logits.clone()
        got = kernel(x, npt, d, torch.zeros(1, 1, 2, n, dtype=torch.float64), 0, definition)
        eager = torch_rows(
            torch.softmax(logits, -1), npt, d, torch.zeros(1, 1, 2, n, dtype=torch.float64), 0, definition
        )
        torch.testing.assert_close(got[..., 3], want_s[..., 3], rtol=0, atol=1e-6)
        ours = (got[..., 3] - want_s[..., 3]).abs().max().item()
        theirs = (eager[..., 3] - want_s[..., 3]).abs().max().item()
        assert ours <= 2 * theirs + 1e-9, (definition, ours, theirs)


@pytest.mark.parametrize("grid", [(14, 14), (7, 13), (1, 9), (9, 1), (1, 1), (5, 24), (8, 8), (2, 264)])
def test_grid_distances_equal_the_dense_matrix(grid):
    """The table's rows and sums against the [P, P] matrix from torch.cdist (fp64), and the
    kernel's sum_k A d against the same in fp64: grids whose width is not a multiple of 8 (the
    kernel copies each row's distances, running past a key row), widths of 8, 24, 264 (read
    straight from the table, in chunks of whole key rows, one row wider than a chunk), one row or
    one column, and the grid's last queries (the copies read past the table's end, into its
    padding)."""
    patch = (16, 12)
    full = metrics.patch_distance_matrix(grid, patch)
    table = kernels.GridDistances.build(grid, patch, torch.float64, "cpu")
    patches = grid[0] * grid[1]
    torch.testing.assert_close(table.rows(0, patches), full, rtol=0, atol=0)
    torch.testing.assert_close(table.sums(), full.sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(table.fp32().rows(0, patches), full.float(), rtol=0, atol=0)
    bare = kernels.GridDistances(table.table.float().clone(), grid)  # no elements to spare
    padded = bare.fp32()
    assert padded is not bare and padded.fp32() is padded
    if kernels.library() is None:
        return
    npt, rows = 1, min(patches, 5)
    n = npt + patches
    logits = trained_logits(2, 2, rows, n, npt, seed=13)
    p0 = patches - rows  # the last rows
    x, cols = logits.clone(), torch.zeros(2, 2, 2, n, dtype=torch.float64)
    stats = kernel(x, npt, table.fp32().at(p0), cols, 0, "park")
    probs = torch.softmax(logits.double(), -1)[..., npt:]
    want = (probs * full[p0 : p0 + rows]).sum(-1)
    torch.testing.assert_close(stats[..., 2], want, rtol=2e-6, atol=1e-6)
    assert want.abs().max() > 10 or patches == 1  # the distances are there to be summed


@needs_cc
@pytest.mark.parametrize("b,h,rows,threads", [(1, 4, 64, 2), (2, 3, 37, 2), (1, 1, 5, 3), (2, 3, 37, 4)])
def test_threads_do_not_change_the_results_beyond_rounding(b, h, rows, threads):
    """Threads take contiguous ranges of (image x head, row): ranges that split an image x head's
    rows (37 rows, 2 or 4 threads) or hold under one row each (5 rows, 3 threads) add its column
    sums from two threads."""
    logits = trained_logits(b, h, rows, 300, 1, seed=5)
    outs = []
    for n_threads in (1, threads):
        before = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            x, cols = logits.clone(), torch.zeros(b, h + 1, 2, 300, dtype=torch.float64)
            outs.append((x, kernel(x, 1, None, cols, 1, "park"), cols))
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_torch_path_equals_kernel_path_through_the_whole_analysis(monkeypatch):
    """A trained-like model analysed with and without the kernel: same distance and sinks, and
    NMI as close to the fp64 truth (timm's explicit attention in fp64) as the PyTorch path. In
    the sink heads NMI is a difference of two nearly equal entropies (~1e-5 of them), so fp32
    rounding of either path shows there at a few 1e-6."""
    backbone = trained_like(positional=True)
    data = torch.randn(4, 3, backbone.img_size, backbone.img_size, generator=torch.Generator().manual_seed(0))
    results = {}
    fallback = kernels.row_statistics

    def not_in_c_mode(*args, **kwargs):  # a silent fallback would make this test compare a path with itself
        assert os.environ["UNIP_KERNEL"] == "torch", (
            "the analysis fell back to PyTorch ops with the kernel built"
        )
        return fallback(*args, **kwargs)

    monkeypatch.setattr(kernels, "row_statistics", not_in_c_mode)
    for mode in ("c", "torch"):
        monkeypatch.setenv("UNIP_KERNEL", mode)
        kernels.library.cache_clear()
        for nmi in ("park", "unip"):
            res = analyze.analyze_backbone(
                backbone, data, batch_size=2, progress=False, nmi=nmi, map_images=0
            )
            results[mode, nmi] = res
    kernels.library.cache_clear()
    maps, *_ = timm_explicit_attention(copy.deepcopy(backbone.model).double(), data.double())
    truth = {
        "park": np.stack(
            [metrics.nmi(metrics.patch_attention(m, 1)).numpy() for m in (maps[i] for i in range(len(maps)))]
        ),
        "unip": np.stack([metrics.nmi_unip(m).numpy() for m in (maps[i] for i in range(len(maps)))]),
    }
    for nmi in ("park", "unip"):
        c, t = results["c", nmi], results["torch", nmi]
        err_c, err_t = (np.abs(np.stack(r.head_nmi) - truth[nmi]).max() for r in (c, t))
        assert err_c <= max(1e-6, 1.5 * err_t), (nmi, err_c, err_t)
        for field, rtol, atol in (("head_distance", 2e-6, 0), ("head_sink_share", 0, 2e-6)):
            got, want = (torch.as_tensor(np.stack(getattr(r, field))) for r in (c, t))
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=field)
        assert np.array_equal(np.stack(c.head_sink_token), np.stack(t.head_sink_token))
    assert np.stack(results["c", "park"].head_sink_share).max() > 0.5  # the sink is there


def test_without_a_compiler_the_analysis_warns_once_and_uses_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIP_KERNEL", "c")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="softmax kernel is not available"):
            assert kernels.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.library() is None  # cached: no second warning
        x = trained_logits(1, 2, 5, 50, 1)
        cols = torch.zeros(1, 2, 2, 50, dtype=torch.float64)
        stats = kernel(x, 1, None, cols, 0, "park")
        torch.testing.assert_close(x.sum(-1), torch.ones(1, 2, 5))
        assert not stats.isnan().any()
    finally:
        kernels.library.cache_clear()


@needs_cc
def test_the_kernel_is_built_once_into_the_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("UNIP_KERNEL", raising=False)
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = list((tmp_path / "unip" / "kernels").glob("attention_rows-*.so"))
        assert len(built) == 1 and not list((tmp_path / "unip" / "kernels").glob("*.so.tmp*"))
        stamp = built[0].stat().st_mtime_ns
        kernels.library.cache_clear()
        assert kernels.library() is not None
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        kernels.library.cache_clear()


def test_bad_shapes_are_refused_with_what_was_expected():
    x = torch.zeros(1, 2, 3, 10)
    cols = torch.zeros(1, 2, 2, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cols: expected fp64 \[1, >= 2, 2, 10\]"):
        kernel(x, 1, None, torch.zeros(1, 2, 2, 9, dtype=torch.float64), 0, "park")
    with pytest.raises(
        ValueError, match=r"d: a grid of 9 patches with rows 0 to 3 in it expected, got 2 x 4"
    ):
        kernel(x, 1, kernels.GridDistances.build((2, 4), 16, torch.float32, "cpu").at(0), cols, 0, "park")
    with pytest.raises(
        ValueError, match=r"d: a grid of 9 patches with rows 7 to 10 in it expected, got 3 x 3"
    ):
        kernel(x, 1, kernels.GridDistances.build((3, 3), 16, torch.float32, "cpu").at(7), cols, 0, "park")
    with pytest.raises(ValueError, match=r"out: expected fp64 \[1, 2, 3, 4\]"):
        kernels.softmax_rows(
            x, 1, None, cols, 0, "park", NMI_EPS, torch.zeros(1, 2, 3, 5, dtype=torch.float64)
        )
    # fp32 sums are refused, not sent quietly down the PyTorch path (run 4 of issue 29 measured that)
    with pytest.raises(
        ValueError, match=r"out: expected fp64 \[1, 2, 3, 4\], got \(1, 2, 3, 4\) torch.float32"
    ):
        kernels.softmax_rows(x, 1, None, cols, 0, "park", NMI_EPS, torch.zeros(1, 2, 3, 4))


def test_head_groups_in_threads_give_the_one_thread_results_and_restore_torch_threads(monkeypatch):
    """With two torch threads the analysis runs its head groups in two threads of one thread
    each (attention._in_threads): the same NMI, distance and sinks as with one, and torch's
    thread count is back afterwards."""
    monkeypatch.setattr(attention, "THREADS_FROM_BYTES", 0)  # a tiny model's maps
    backbone = trained_like(arch="vit_tiny_patch16_224(depth=2,embed_dim=64,num_heads=4,patch_size=8)")
    data = torch.randn(2, 3, backbone.img_size, backbone.img_size, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            observer = analyze.LayerObserver(2, (4, 4), 8, 1)
            observer.start_batch(2)
            # blocks of one head: four groups, two a thread
            with (
                torch.inference_mode(),
                attention.observe_attention(backbone.model, observer, block_bytes=512),
            ):
                backbone.model.forward_features(data)
            assert torch.get_num_threads() == threads
            results[threads] = observer
    finally:
        torch.set_num_threads(before)
    one, two = results[1], results[2]
    for layer in range(2):
        torch.testing.assert_close(two.nmi[layer][0], one.nmi[layer][0], rtol=0, atol=1e-9)
        torch.testing.assert_close(two.distance[layer][0], one.distance[layer][0], rtol=1e-9, atol=0)
        for a, b in zip(two.sinks[layer][0], one.sinks[layer][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_the_threads_are_used_from_the_layer_size_on_where_torch_has_two(monkeypatch):
    calls = []
    real = attention._in_threads
    monkeypatch.setattr(
        attention, "_in_threads", lambda fn, parts: calls.append(len(parts)) or real(fn, parts)
    )
    backbone = trained_like(arch="vit_tiny_patch16_224(depth=1,embed_dim=64,num_heads=4,patch_size=8)")
    maps = 4 * 4 * 17 * 17  # this layer's maps for one image: 4 heads, 17 tokens, fp32
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threshold in (maps, maps + 1):
            monkeypatch.setattr(attention, "THREADS_FROM_BYTES", threshold)
            observer = analyze.LayerObserver(1, (4, 4), 8, 1)
            observer.start_batch(1)
            with torch.no_grad(), attention.observe_attention(backbone.model, observer, block_bytes=512):
                backbone.model.forward_features(torch.randn(1, 3, 32, 32))
    finally:
        torch.set_num_threads(before)
    assert calls == [2]  # two threads at the threshold, none one byte below it


@needs_cc
@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds the x86-64 baseline")
def test_the_portable_path_without_avx2_equals_the_fp64_reference(monkeypatch, tmp_path):
    """The kernel built for the x86-64 baseline (no AVX2: the C loops every other CPU gets)."""
    import ctypes

    target = tmp_path / "portable.so"
    compiler = shutil.which("cc") or shutil.which("gcc")
    kernels._compile(compiler, target, ["-O2", "-march=x86-64", "-fPIC", "-shared"])
    portable = kernels._declare(ctypes.CDLL(str(target)))
    monkeypatch.setattr(kernels, "library", lambda: portable)
    for definition in ("park", "unip"):
        npt, n = 5, 205
        logits = trained_logits(2, 2, 11, n, npt, seed=7)
        d = grid_rows(n, npt, 11, p0=n)
        want_p, want_s, want_c = reference(logits, npt, d, definition, 0, 2)
        x, cols = logits.clone(), torch.zeros(2, 2, 2, n, dtype=torch.float64)
        stats = kernel(x, npt, d, cols, 0, definition)
        torch.testing.assert_close(x.double(), want_p, rtol=2e-6, atol=1e-12)
        torch.testing.assert_close(stats[..., :3], want_s[..., :3], rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(stats[..., 3], want_s[..., 3], rtol=0, atol=2e-6)
        torch.testing.assert_close(cols, want_c, rtol=2e-6, atol=1e-9)
