"""The layer_selection.json contract: one module writes, reads and validates it."""

import copy
import json

import pytest

from unip_analysis import analyze, selection
from unip_analysis.checkpoints import load_backbone
from unip_analysis.errors import SelectionError
from unip_analysis.patterns import default_thresholds


@pytest.fixture
def doc(tiny_timm_checkpoint, image_dir):
    arch, path = tiny_timm_checkpoint
    bb = load_backbone("timm", arch, path, img_size=32)
    res = analyze.analyze_backbone(bb, analyze.image_dataset(image_dir, 32), name="t", progress=False)
    th = default_thresholds(res.grid)
    return {
        "schema_version": selection.SCHEMA_VERSION,
        "generator": "test",
        "created": "2026-01-01T00:00:00Z",
        "thresholds": {"global_max": th.global_max, "local_min": th.local_min},
        "images": {"dir": str(image_dir), "count": res.n_images, "img_size": 32, "norm": "imagenet"},
        "models": {"t": analyze.model_entry(res, th, layer=3, n_boot=50)},
    }


def test_round_trip_and_teacher_resolution(doc, tmp_path):
    path = selection.write(tmp_path / "sel.json", doc)
    back = selection.read(path)
    assert back == json.loads(json.dumps(doc))
    entry, layer = selection.resolve_teacher(back, "t")
    assert layer == 3 and entry["selected_heads"] == entry["heads_per_layer"][2]
    assert selection.resolve_teacher(back, "t", layer=2)[1] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=3), "schema_version is 3"),
        (lambda d: d.pop("thresholds"), "lacks 'thresholds'"),
        (lambda d: d["models"]["t"]["layers"].pop(), "depth 4 but 3 layers"),
        (lambda d: d["models"]["t"]["layers"][0].update(pattern="weird"), "pattern 'weird'"),
        (lambda d: d["models"]["t"]["layers"][1].update(nmi=float("nan")), "nmi should be float"),
        (lambda d: d["models"]["t"].update(selected_layer=9), "selected_layer must be null or 1..4"),
        (lambda d: d["models"]["t"].update(selected_heads=7), "disagrees with heads_per_layer"),
        (lambda d: d.update(nmi_definition="pmi"), "nmi_definition 'pmi' not in"),
        (lambda d: d["models"]["t"]["robustness"]["margins"].pop(), "3 margins for depth 4"),
        (lambda d: d["models"]["t"]["robustness"]["margins"][0].update(edge="mid"), "edge 'mid'"),
        (
            lambda d: d["models"]["t"]["robustness"].update(
                fragile=not d["models"]["t"]["robustness"]["fragile"]
            ),
            "fragile is",
        ),
        (
            lambda d: d["models"]["t"]["robustness"]["moved_bands"][0].update(valid=False, selected_layer=2),
            "crossed bands",
        ),
        (lambda d: d["models"]["t"]["robustness"].update(rule_layer=5), "rule_layer must be null or 1..4"),
    ],
)
def test_validation_names_the_problem(doc, tmp_path, mutate, message):
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(SelectionError, match=message):
        selection.write(tmp_path / "sel.json", bad)
    assert not (tmp_path / "sel.json").exists()


def test_teacher_refusals(doc, tmp_path):
    path = selection.write(tmp_path / "sel.json", doc)
    d = selection.read(path)
    with pytest.raises(SelectionError, match="no model named 'nope'.*has: t"):
        selection.resolve_teacher(d, "nope")
    d["models"]["t"].update(selected_layer=None, selected_heads=None)
    with pytest.raises(SelectionError, match="selected_layer null.*--layer"):
        selection.resolve_teacher(d, "t")
    assert selection.resolve_teacher(d, "t", layer=1)[1] == 1
    weights = d["models"]["t"]["weights"]
    with open(weights, "ab") as f:
        f.write(b"changed")
    with pytest.raises(SelectionError, match="sha256 .* differs"):
        selection.resolve_teacher(d, "t", layer=1)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SelectionError, match="not valid JSON"):
        selection.read(tmp_path / "broken.json")


def test_nmi_definition_and_robustness_round_trip_and_old_files_read_as_park(doc, tmp_path):
    rob = doc["models"]["t"]["robustness"]
    assert len(rob["margins"]) == 4 and len(rob["moved_bands"]) == 15 and isinstance(rob["fragile"], bool)
    assert "nmi_definition" not in doc and selection.nmi_definition(doc) == "park"
    unip = copy.deepcopy(doc) | {"nmi_definition": "unip"}
    back = selection.read(selection.write(tmp_path / "unip.json", unip))
    assert back["nmi_definition"] == "unip" and selection.nmi_definition(back) == "unip"
    assert back["models"]["t"]["robustness"] == json.loads(json.dumps(rob))
    # a file written before the two fields: still schema version 1, read as Park et al.'s NMI
    old = copy.deepcopy(doc)
    del old["models"]["t"]["robustness"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert selection.nmi_definition(selection.read(tmp_path / "old.json")) == "park"
