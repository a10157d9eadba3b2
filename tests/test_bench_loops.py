"""Smoke tests of the loop benchmarks (benchmarks/bench_finetune.py, bench_pretrain_loop.py,
bench_loader_overlap.py) at tiny size: they drive the real loops, time the bare ones, and report
every field. No time is asserted."""

from test_benchmarks import run_quick  # the same way of running a benchmark's --quick mode


def test_bench_finetune_quick():
    report = run_quick("bench_finetune.py")
    assert [(r["head"], r["mode"]) for r in report["results"]] == [
        ("upernet", "ft"),
        ("ll-fpn", "ft"),
        ("linear", "lp"),
    ]
    for res in report["results"]:
        assert res["real_s_per_iter"] > 0 and res["bare_s_per_iter"] > 0 and res["data_s_per_batch"] > 0
        ratio = res["real_s_per_iter"] / res["bare_s_per_iter"]  # of the rounded times
        assert abs(res["ratio_real_over_bare"] - ratio) <= 0.01 * ratio
        assert len(res["round_ratios"]) == 2 and res["ratio_real_over_bare"] == min(res["round_ratios"])
        floor = 1 + res["data_s_per_batch"] / res["bare_s_per_iter"]  # in-process loading's floor
        assert (
            res["ratio_floor_in_process"] > 1 and abs(res["ratio_floor_in_process"] - floor) <= 0.01 * floor
        )
        parts = res["split"]["seconds"]
        assert parts["backbone_fwd"] > 0 and parts["heads_fwd"] > 0 and parts["heads_bwd"] > 0
        assert abs(sum(res["split"]["share"].values()) - 1) < 0.01
        if res["mode"] == "ft":  # the backbone and the neck train: their backward is timed
            assert parts["backbone_bwd"] > 0 and parts["neck_fwd"] > 0 and parts["neck_bwd"] > 0
        else:  # linear probing: a frozen backbone, no neck
            assert parts["backbone_bwd"] == parts["neck_fwd"] == parts["neck_bwd"] == 0
    upernet, light, _ = report["results"]
    assert light["aux_channels"] == light["head_channels"] == 32 and upernet["aux_channels"] == 256
    small = report["small_data"]
    assert set(small["seconds"]) == {"workers_0", "workers_default"} and small["ratio_default_over_0"] > 0


def test_bench_finetune_variants_set_precision_and_memory_order():
    report = run_quick(
        "bench_finetune.py", "--heads", "linear", "--variants", "default", "bf16+nocl", "--no-small-data"
    )
    default, other = report["results"]
    assert (default["variant"], default["amp"], default["device"], default["channels_last"]) == (
        "default",
        "float32",
        "cpu",
        True,
    )
    assert (other["variant"], other["amp"], other["channels_last"]) == ("bf16+nocl", "bfloat16", False)
    assert other["real_s_per_iter"] > 0 and other["split"]["seconds"]["backbone_fwd"] > 0


def test_bench_pretrain_loop_quick():
    report = run_quick("bench_pretrain_loop.py")
    assert [r["method"] for r in report["results"]] == ["nmi-had", "pad"]
    for res in report["results"]:
        assert res["steps"] == 3 and res["real_s_per_step"] > 0 and res["bare_s_per_step"] > 0
        ratio = res["real_s_per_step"] / res["bare_s_per_step"]  # of the rounded times
        assert abs(res["ratio_real_over_bare"] - ratio) <= 0.01 * ratio


def test_bench_loader_overlap_quick():
    """Every loading arrangement is timed (the OMP_WAIT_POLICY=PASSIVE ones in a child process), each
    ratio is over this process's bare step, and the in-process floor is bare + one batch's data."""
    report = run_quick("bench_loader_overlap.py")
    seconds, ratios = report["s_per_iter"], report["ratio_over_bare"]
    names = {"bare", "in_process", "thread", "worker", "bare_1", "thread_1", "worker_1"}
    assert set(seconds) == names | {"passive_bare", "passive_in_process", "passive_worker"}
    assert all(v > 0 for v in seconds.values()) and ratios["bare"] == 1.0
    for name, value in seconds.items():
        assert abs(ratios[name] - value / seconds["bare"]) <= 0.01 * ratios[name]
    floor = 1 + report["data_s_per_batch"] / seconds["bare"]
    assert abs(report["floor_in_process"] - floor) <= 0.01 * floor
