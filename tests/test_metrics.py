"""NMI and attention distance against independent implementations and known cases."""

import math

import numpy as np
import pytest
import torch

from unip_analysis.metrics import (
    attention_distance,
    bootstrap_ci,
    local_window_attention,
    nmi,
    patch_attention,
    patch_distance_matrix,
    shared_attention,
)
from unip_analysis.patterns import Thresholds, classify, default_thresholds, prototype_nmi, select_layer


def nmi_reference_formula(attn: torch.Tensor) -> torch.Tensor:
    """The published formula term by term: p(q) uniform, p(k) = sum_q p(q) A[q,k],
    I = sum_qk p(q) A log(A / p(k)), NMI = I / sqrt(H(Q) H(K))."""
    b, h, q, k = attn.shape
    pq = torch.full((b, h, q), 1.0 / q, dtype=torch.float64)
    a = attn.double()
    pk = (a * pq[..., None]).sum(dim=2)
    mi = (a * pq[..., None] * torch.log(a / pk[:, :, None, :])).sum(dim=(2, 3))
    hq = -(pq * torch.log(pq)).sum(-1)
    hk = -(pk * torch.log(pk)).sum(-1)
    return mi / torch.sqrt(hq * hk)


def nmi_loops(a: np.ndarray) -> float:
    """Plain-Python loops over one [N, N] map, from the definition of mutual information."""
    n = a.shape[0]
    pk = [sum(a[q, k] / n for q in range(n)) for k in range(n)]
    mi = sum((1 / n) * a[q, k] * math.log(a[q, k] / pk[k]) for q in range(n) for k in range(n) if a[q, k] > 0)
    hk = -sum(p * math.log(p) for p in pk if p > 0)
    return mi / math.sqrt(math.log(n) * hk)


def random_attention(b=3, h=4, n=1 + 49, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, n, generator=g) * sharp).softmax(-1)


def test_nmi_matches_reference_formula_to_1e5():
    attn = patch_attention(random_attention(), num_prefix_tokens=1)
    ours = nmi(attn)
    ref = nmi_reference_formula(attn)
    assert ours.shape == (3, 4)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, torch.zeros_like(ours))  # a non-trivial case


def test_nmi_matches_plain_loops():
    attn = patch_attention(random_attention(b=1, h=2, n=17, seed=3), num_prefix_tokens=1)
    ours = nmi(attn)
    for head in range(2):
        assert ours[0, head].item() == pytest.approx(nmi_loops(attn[0, head].double().numpy()), abs=1e-6)


def test_identical_rows_give_zero_and_identity_gives_one():
    n = 36
    shared = torch.rand(n, generator=torch.Generator().manual_seed(0)).softmax(0).expand(n, n)[None, None]
    assert nmi(shared).item() == pytest.approx(0.0, abs=1e-7)  # float32 input
    assert nmi(shared_attention(n)[None, None]).item() == pytest.approx(0.0, abs=1e-9)
    eye = patch_attention(torch.eye(n)[None, None], 0)  # + eps keeps logs finite
    assert nmi(eye).item() == pytest.approx(1.0, abs=1e-5)


def test_local_windows_read_high_and_mixtures_fall_between():
    grid = (8, 8)
    local = local_window_attention(grid, radius=1)[None, None]
    v_local = nmi(local).item()
    v_mix = nmi(0.5 * local + 0.5 * shared_attention(64)[None, None]).item()
    assert v_local > 0.5
    assert 0.0 < v_mix < v_local
    # monotone in the local weight
    vals = [prototype_nmi(grid, w) for w in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert vals == sorted(vals)


def test_patch_attention_drops_prefix_and_renormalizes():
    attn = random_attention(b=1, h=1, n=1 + 4 + 16)  # cls + 4 registers + 4x4 grid
    a = patch_attention(attn, num_prefix_tokens=5)
    assert a.shape == (1, 1, 16, 16)
    assert torch.allclose(a.sum(-1), torch.ones(1, 1, 16))


def test_attention_distance_in_pixels():
    d = patch_distance_matrix((3, 3), 16)
    assert d[0, 1].item() == 16 and d[0, 4].item() == pytest.approx(16 * math.sqrt(2))
    self_only = torch.eye(9)[None, None]
    assert attention_distance(self_only, d).item() == 0.0
    # all attention on the opposite corner from corner 0
    a = torch.zeros(1, 1, 9, 9)
    a[..., 8] = 1.0
    expected = d[:, 8].mean().item()
    assert attention_distance(a, d).item() == pytest.approx(expected)


def test_bootstrap_ci_contains_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = rng.normal(0.3, 0.05, 10)
    large = rng.normal(0.3, 0.05, 1000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s)
    assert bootstrap_ci(np.array([0.2])) == (0.2, 0.2)


def test_default_thresholds_depend_on_grid_and_order_patterns():
    t14, t28 = default_thresholds((14, 14)), default_thresholds((28, 28))
    assert 0 < t14.global_max < t14.local_min < 1
    assert t14 != t28  # derived at the analysed grid, not fixed numbers
    th = Thresholds(0.05, 0.2)
    assert [classify(v, th) for v in (0.01, 0.1, 0.5)] == ["global", "hybrid", "local"]


def test_select_deepest_hybrid_override_and_fallback():
    th = Thresholds(0.05, 0.2)
    nmis = [0.5, 0.3, 0.15, 0.1, 0.3, 0.02]
    pats = [classify(v, th) for v in nmis]
    assert select_layer(nmis, pats, th).layer == 4
    assert select_layer(nmis, pats, th, override=2).layer == 2
    with pytest.raises(ValueError):
        select_layer(nmis, pats, th, override=7)
    all_local = [0.5, 0.4, 0.25, 0.3]
    sel = select_layer(all_local, [classify(v, th) for v in all_local], th)
    assert sel.fallback and sel.layer == 3 and "no layer is hybrid" in sel.rule
    none = select_layer(all_local, [classify(v, th) for v in all_local], th, fallback="none")
    assert none.layer is None


@pytest.mark.parametrize("rows", [1, 5, 8, 36, 100])  # a row each, uneven blocks, one block, more than rows
def test_streamed_statistics_equal_the_reference_formulas(rows):
    from attention_reference import distance_reference, nmi_reference

    from unip_analysis.metrics import map_statistics

    attn = random_attention(b=2, h=3, n=1 + 4 + 36, seed=5)
    want_nmi, want_dist = nmi_reference(attn, 5), distance_reference(attn, 5, (6, 6), 16)
    got_nmi, got_dist = map_statistics(attn.double(), 5, (6, 6), 16, rows=rows)
    assert torch.allclose(got_nmi, want_nmi, atol=1e-9, rtol=0)
    assert torch.allclose(got_dist, want_dist, rtol=1e-9)
    f_nmi, f_dist = map_statistics(attn.float(), 5, (6, 6), 16, rows=rows)  # as the analysis runs it
    assert torch.allclose(f_nmi, want_nmi, atol=1e-6, rtol=0)
    assert torch.allclose(f_dist, want_dist, rtol=1e-5)
    assert torch.allclose(got_nmi, nmi(patch_attention(attn, 5)), atol=1e-9)  # the pure function agrees


def test_distance_renormalizes_with_1e32_and_nmi_with_1e8():
    """Rows that put nearly all mass on the cls token (patch mass ~1e-7): 1e-8 would pull the
    distance toward the uniform row's; the reference uses 1e-32 there (method.md section 1)."""
    from attention_reference import distance_reference, nmi_reference

    from unip_analysis.metrics import DISTANCE_EPS, NMI_EPS, attention_distance, map_statistics

    assert (NMI_EPS, DISTANCE_EPS) == (1e-8, 1e-32)
    g = torch.Generator().manual_seed(1)
    n = 1 + 36
    logits = torch.randn(1, 2, n, n, generator=g) * 2
    logits[..., 0] += 22.0  # every query: almost everything on cls
    attn = logits.double().softmax(-1)
    assert attn[..., 1:, 1:].sum(-1).max() < 1e-4
    d = patch_distance_matrix((6, 6), 16)
    got_nmi, got_dist = map_statistics(attn, 1, (6, 6), 16, rows=7)
    with_1e32 = attention_distance(patch_attention(attn, 1, eps=DISTANCE_EPS), d)
    with_1e8 = attention_distance(patch_attention(attn, 1, eps=NMI_EPS), d)
    assert torch.allclose(got_dist, with_1e32, rtol=1e-9)
    assert torch.allclose(got_dist, distance_reference(attn, 1, (6, 6), 16), rtol=1e-9)
    assert (got_dist - with_1e8).abs().max() > 0.5  # the choice of eps matters here, in pixels
    assert torch.allclose(got_nmi, nmi_reference(attn, 1), atol=1e-9)


def test_streaming_statistics_refuse_prefix_rows_and_missing_rows():
    from unip_analysis.metrics import StreamingStatistics

    stats = StreamingStatistics(1, 1, (2, 2), 16, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="prefix"):
        stats.add_(0, torch.full((1, 1, 1, 5), 0.2))
    stats.add_(1, torch.full((1, 1, 2, 5), 0.2))
    with pytest.raises(ValueError, match="saw 2 patch query rows of 4"):
        stats.result()


def test_patch_attention_query_rows_equal_selecting_after_the_full_map():
    attn = random_attention(b=2, h=3, n=1 + 4 + 36, seed=9)
    rows = torch.tensor([0, 7, 35, 7])
    want = patch_attention(attn, 5).index_select(-2, rows)
    assert torch.equal(patch_attention(attn, 5, query_rows=rows), want)


# --- UNIP's published NMI (--nmi unip) ------------------------------------------------------------


def test_nmi_unip_equals_the_published_function_on_explicit_maps():
    from attention_reference import nmi_unip_published

    from unip_analysis.metrics import nmi_unip

    for prefix in range(1, 6):  # cls; cls + distillation token; cls + registers
        attn = random_attention(b=2, h=3, n=prefix + 3 * 5, seed=prefix)  # 3x5 grid: not square
        ours, ref = nmi_unip(attn), nmi_unip_published(attn)
        assert ours.shape == (2, 3)
        assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
        # the published function returns the mean over heads per image
        assert torch.allclose(ours.mean(-1), ref.mean(-1), atol=1e-12)
        # the prefix tokens take part: not Park et al.'s value on the renormalised patch block
        assert (ours - nmi(patch_attention(attn, prefix))).abs().max() > 1e-4
    # the patch block fed alone, rows NOT renormalised: p(q) is not uniform
    block = random_attention(b=1, h=2, n=2 + 12, seed=7)[..., 2:, 2:]
    assert block.sum(-1).std() > 1e-3
    assert torch.allclose(nmi_unip(block), nmi_unip_published(block), atol=1e-12, rtol=0)


def test_nmi_unip_known_values_and_zeros():
    from unip_analysis.metrics import nmi_unip

    eye = torch.eye(6, dtype=torch.float64)[None, None]  # exact zeros: 0 log 0 taken as 0
    assert nmi_unip(eye).item() == pytest.approx(1.0, abs=1e-12)
    assert nmi_unip(shared_attention(10)[None, None]).item() == pytest.approx(0.0, abs=1e-12)
    # rows of unequal mass, as published: p(q) = (3/4, 1/4), p(k) = (1/4, 3/4), H(Q) = H(K) = h;
    # joint = A p(q) = 9/4 and 1/4 (not a distribution: the value leaves [0, 1]); I = (5/2) log 4
    swap = torch.tensor([[0.0, 3.0], [1.0, 0.0]], dtype=torch.float64)[None, None]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert nmi_unip(swap).item() == pytest.approx(2.5 * math.log(4) / h, abs=1e-12)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 100])  # a row each, blocks mixing prefix and patch rows, one
def test_streamed_unip_nmi_equals_the_direct_function(rows):
    from attention_reference import distance_reference, nmi_unip_published

    from unip_analysis.metrics import map_statistics

    for prefix in (1, 2, 5):
        attn = random_attention(b=2, h=3, n=prefix + 4 * 6, seed=10 + prefix)  # 4x6 grid
        want = nmi_unip_published(attn)
        got, dist = map_statistics(attn.double(), prefix, (4, 6), 16, rows=rows, nmi_definition="unip")
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        f32, _ = map_statistics(attn.float(), prefix, (4, 6), 16, rows=rows, nmi_definition="unip")
        assert torch.allclose(f32, want, atol=1e-6, rtol=0)  # fp32 blocks, as the analysis runs
        # the distance is Park et al.'s under either definition
        assert torch.allclose(dist, distance_reference(attn, prefix, (4, 6), 16), rtol=1e-9)
    # rows that do not sum to 1 (p(q) not uniform, W_k != C_k): the decomposition stays exact
    g = torch.Generator().manual_seed(3)
    uneven = torch.rand(1, 2, 2 + 12, 2 + 12, generator=g, dtype=torch.float64) ** 3
    got, _ = map_statistics(uneven, 2, (3, 4), 16, rows=rows, nmi_definition="unip")
    assert torch.allclose(got, nmi_unip_published(uneven), atol=1e-12, rtol=0)


def test_streaming_unip_counts_prefix_rows_and_refuses_missing_rows():
    from unip_analysis.metrics import StreamingStatistics

    stats = StreamingStatistics(1, 1, (2, 2), 16, num_prefix_tokens=1, nmi_definition="unip")
    stats.add_(0, torch.full((1, 1, 1, 5), 0.2))  # the cls row: accepted under 'unip'
    stats.add_(1, torch.full((1, 1, 4, 5), 0.2))
    nmi_, _ = stats.result()
    assert nmi_.item() == pytest.approx(0.0, abs=1e-6)  # every row the same: collapse (fp32 rows)
    short = StreamingStatistics(1, 1, (2, 2), 16, num_prefix_tokens=1, nmi_definition="unip")
    short.add_(1, torch.full((1, 1, 4, 5), 0.2))  # the cls row never came
    with pytest.raises(ValueError, match="saw 4 query rows of 5"):
        short.result()
    with pytest.raises(ValueError, match="NMI definition 'pmi'"):
        StreamingStatistics(1, 1, (2, 2), 16, num_prefix_tokens=1, nmi_definition="pmi")


@pytest.mark.parametrize("kind", ["registers", "deit_distilled"])  # 5 and 2 prefix tokens
def test_observed_unip_nmi_equals_the_published_function_on_timm_maps(kind):
    """Through the blocks' own forward (prefix rows delivered as a block of their own, patch rows
    in several blocks), on a non-square grid: equal to the published function on timm's maps."""
    from attention_reference import ATTENTION_ARCHS, nmi_unip_published, randomize, timm_explicit_attention

    from unip_analysis.analyze import LayerObserver
    from unip_analysis.attention import observe_attention
    from unip_analysis.checkpoints import build_vit

    model = randomize(build_vit(ATTENTION_ARCHS[kind], img_size=(24, 40)).eval(), seed=2)
    npt, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    assert grid == (3, 5) and npt in (2, 5)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    maps, *_ = timm_explicit_attention(model, x)
    observer = LayerObserver(len(model.blocks), grid, 8, npt, nmi_definition="unip")
    with torch.no_grad(), observe_attention(model, observer, block_bytes=2 * 2 * (npt + 15) * 4 * 4):
        model.forward_features(x)
    for layer, full in maps.items():
        got = observer.nmi[layer][0]
        assert torch.allclose(got, nmi_unip_published(full), atol=1e-6, rtol=0)


def test_bands_are_derived_with_the_definition_they_are_applied_to(monkeypatch):
    from unip_analysis import patterns

    for grid in ((4, 4), (3, 5), (14, 14)):
        park, unip = default_thresholds(grid), default_thresholds(grid, "unip")
        assert "park NMI" in park.source and "unip NMI" in unip.source
        # prototypes have no prefix tokens and rows summing to 1: the two definitions agree there
        for w in (0.1, 0.5):
            assert prototype_nmi(grid, w, nmi_definition="unip") == pytest.approx(
                prototype_nmi(grid, w), abs=1e-9
            )
        assert (unip.global_max, unip.local_min) == (park.global_max, park.local_min)
    calls = []
    monkeypatch.setattr(patterns, "nmi_unip", lambda a: calls.append(a.shape) or torch.full((1, 1), 0.5))
    assert prototype_nmi((3, 5), 0.5, nmi_definition="unip") == 0.5 and calls == [(1, 1, 15, 15)]
    with pytest.raises(ValueError, match="NMI definition 'pmi'"):
        default_thresholds((4, 4), "pmi")


# --- how robust a selection is ------------------------------------------------------------------


def _cells(rob: dict) -> dict:
    return {(c["global_max_factor"], c["local_min_factor"]): c for c in rob["moved_bands"]}


def test_robustness_flags_a_selection_next_to_a_band_edge():
    from unip_analysis.patterns import robustness

    th = Thresholds(0.015, 0.2)
    near = [0.3, 0.4, 0.135, 0.025, 0.004]  # layer 4 sits 0.010 above global_max
    rob = robustness(near, [[v - 0.004, v + 0.004] for v in near], th)
    assert rob["rule_layer"] == 4 and rob["fragile"]
    cells = _cells(rob)
    assert len(cells) == 5 * 3 and all(c["valid"] for c in cells.values())  # 8 x 0.015 < 0.75 x 0.2
    assert cells[0.5, 1.0]["selected_layer"] == 4 and cells[1.0, 1.25]["selected_layer"] == 4
    assert cells[2.0, 1.0]["selected_layer"] == 3  # global_max 0.03: layer 4 reads global
    assert cells[2.0, 1.0]["global_max"] == pytest.approx(0.03) and cells[1.0, 0.75][
        "local_min"
    ] == pytest.approx(0.15)
    m = rob["margins"]
    assert [g["edge"] for g in m] == ["local_min", "local_min", "local_min", "global_max", "global_max"]
    assert m[3]["margin"] == pytest.approx(0.010) and m[3]["margin_ci95"] == pytest.approx([0.006, 0.014])
    assert not m[3]["edge_in_ci95"]
    assert m[2]["margin"] == pytest.approx(-0.065)  # below local_min: hybrid by 0.065
    wide = robustness(near, [[v - 0.02, v + 0.02] for v in near], th)
    assert wide["margins"][3]["edge_in_ci95"]  # the interval reaches below global_max


def test_robustness_not_fragile_far_from_the_edges():
    from unip_analysis.patterns import robustness

    th = Thresholds(0.015, 0.2)
    far = [0.3, 0.4, 0.135, 0.005, 0.004]  # layer 3 hybrid in every moved band, 4-5 always global
    rob = robustness(far, [[v, v] for v in far], th)
    assert rob["rule_layer"] == 3 and not rob["fragile"]
    assert {c["selected_layer"] for c in rob["moved_bands"]} == {3}


def test_robustness_skips_crossed_bands_and_follows_the_fallback():
    from unip_analysis.patterns import robustness

    th = Thresholds(0.03, 0.2)  # x8: 0.24, above local_min x0.75 and x1, below x1.25
    rob = robustness([0.6, 0.1, 0.001], [[0, 1]] * 3, th)
    cells = _cells(rob)
    assert not cells[8.0, 0.75]["valid"] and not cells[8.0, 1.0]["valid"] and cells[8.0, 1.25]["valid"]
    assert cells[8.0, 0.75]["selected_layer"] is None and cells[8.0, 1.0]["selected_layer"] is None
    # x4 (0.12, 0.2): no layer is hybrid, and the fallback's nearest layer is still 2 (0.1)
    assert rob["rule_layer"] == 2 and cells[4.0, 1.0]["selected_layer"] == 2
    assert not rob["fragile"]  # the crossed bands (null) do not count as a change
    # with layer 1 at 0.3, the nearest layer to (0.24, 0.25) becomes layer 1
    moved = robustness([0.3, 0.1, 0.001], [[0, 1]] * 3, th)
    assert _cells(moved)[8.0, 1.25]["selected_layer"] == 1 and moved["fragile"]
    # fallback none: no layer selected at the given bands, but layer 2 turns hybrid at local_min x1.25
    local = [0.5, 0.22]
    none = robustness(local, [[v, v] for v in local], Thresholds(0.015, 0.2), fallback="none")
    assert none["rule_layer"] is None and none["fragile"] and _cells(none)[1.0, 1.25]["selected_layer"] == 2
    steady = robustness([0.5, 0.6], [[0.5, 0.5], [0.6, 0.6]], Thresholds(0.015, 0.2), fallback="none")
    assert steady["rule_layer"] is None and not steady["fragile"]
