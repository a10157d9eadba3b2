"""Object proposals for PAD: the file layout and format, the training-time crop rule with keyed
generators, the dataset using it, and unip-rois on a synthetic infrared scene."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from unip_analysis.images import normalize
from unip_train.pretrain import data as data_pretrain
from unip_train.pretrain import proposals, rois, rois_cli
from unip_train.sampling import sample_generator


def test_proposal_files_follow_pads_layout(tmp_path):
    msip = tmp_path / "MSIP"
    image = msip / "ds1" / "thermal" / "000123.png"
    assert rois.proposal_file(msip, msip, image) == msip / "ds1" / "roi" / "000123.txt"  # PAD's own
    assert rois.proposal_file(tmp_path / "R", msip, image) == tmp_path / "R" / "ds1" / "roi" / "000123.txt"
    flat = tmp_path / "flat"
    assert rois.proposal_file(tmp_path / "R", flat, flat / "a.b.jpg") == tmp_path / "R" / "roi" / "a.txt"
    path = rois.write_proposals(tmp_path / "R" / "roi" / "a.txt", [(1, 2, 40, 50), (0, 0, 60, 61)])
    assert path.read_text() == "1,2,40,50\n0,0,60,61\n"
    assert rois.read_proposals(path).tolist() == [[1, 2, 40, 50], [0, 0, 60, 61]]
    (tmp_path / "empty.txt").write_text("")
    assert rois.read_proposals(tmp_path / "empty.txt").shape == (0, 4)
    (tmp_path / "bad.txt").write_text("1,2,40,50\n1,2,40\n")
    with pytest.raises(rois.ProposalError, match=r"bad.txt: line 2 is '1,2,40', expected x,y,w,h"):
        rois.read_proposals(tmp_path / "bad.txt")


def crop(h: int, w: int, boxes, seed: int, epoch: int = 0, index: int = 0):
    return rois.roi_crop_box(h, w, np.asarray(boxes).reshape(-1, 4), sample_generator(seed, epoch, index))


def asked_for_large(seed: int, epoch: int = 0, index: int = 0) -> bool:
    """The first draw of the sample's generator decides whether the crop must be large."""
    return torch.rand(1, generator=sample_generator(seed, epoch, index)).item() < rois.LARGE_CROP_PROB


def test_crop_rule_inside_the_image_60px_centre_within_40_percent_and_large_when_required():
    h, w = 400, 500
    box = (200, 150, 80, 60)  # x, y, w, h: far from the borders, so no crop is clipped
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    large = 0
    for seed in range(300):
        got = crop(h, w, [box], seed)
        if asked_for_large(seed):  # at most 120 x 90 px: never 15% of 400 x 500, so it falls back
            assert got is None
            large += 1
            continue
        top, left, ch, cw = got
        assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w
        assert ch >= 60 and cw >= 60
        # centre moved by at most 40% of the proposal's side (+1 px of rounding each way)
        assert abs(left + cw / 2 - cx) <= 0.4 * box[2] + 1.5 and abs(top + ch / 2 - cy) <= 0.4 * box[3] + 1.5
        # each side is the proposal's scaled by U(0.7, 1.5), at least 60 px
        assert 60 - 1 <= cw <= 1.5 * box[2] + 1 and max(60, 0.7 * box[3]) - 1 <= ch <= 1.5 * box[3] + 1
    assert 20 < large < 80  # about 15% of 300 ask for a large crop
    # Required to cover 15% of a small image: every crop that comes back does.
    # Required to cover 15% of a 200 x 200 image (6000 px): crops of a 60 x 60 proposal span 3600 to
    # 8100 px, so the rule decides; every large crop that comes back covers 15%, smaller ones exist.
    areas = {True: [], False: []}
    for seed in range(400):
        got = crop(200, 200, [(70, 70, 60, 60)], seed)
        if got is not None:
            areas[asked_for_large(seed)].append(got[2] * got[3])
    assert len(areas[True]) > 20 and min(areas[True]) >= 6000
    assert min(areas[False]) < 6000 <= max(areas[False])


def test_crop_rule_falls_back_when_no_proposal_fits_and_depends_only_on_seed_epoch_index():
    assert crop(200, 200, np.zeros((0, 4)), 0) is None  # no proposals
    assert crop(200, 200, [(10, 10, 39, 80)], 0) is None  # narrower than 40 px
    assert crop(200, 200, [(180, 10, 50, 50)], 0) is None  # outside the image
    huge = (0, 0, 1000, 1000)
    assert crop(200, 200, [huge], 0) is None
    a = crop(300, 300, [(50, 60, 70, 80), (150, 100, 90, 60)], seed=3, epoch=2, index=7)
    torch.manual_seed(123)  # the global RNG has no say
    assert crop(300, 300, [(50, 60, 70, 80), (150, 100, 90, 60)], seed=3, epoch=2, index=7) == a
    others = {crop(300, 300, [(50, 60, 70, 80), (150, 100, 90, 60)], 3, 2, i) for i in range(8)}
    assert len(others) > 4


def test_dataset_crops_around_proposals_and_falls_back_without(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (240, 320), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    src = data_pretrain.collect_source(tmp_path, "infrared")
    boxes = [np.array([[100, 80, 60, 50]]), None]  # a has one proposal, b none
    ds = data_pretrain.InfMix([src], 32, (0.5,) * 3, (0.25,) * 3, seed=4, proposals=boxes)
    ds.set_epoch(1)
    for i, expected_box in ((0, "roi"), (1, "rrc")):
        out, _ = ds[i]
        g = sample_generator(4, 1, i)
        img = ds.load(i)
        box = rois.roi_crop_box(240, 320, boxes[i], g) if boxes[i] is not None else None
        assert (box is not None) == (expected_box == "roi")
        top, left, ch, cw = box if box is not None else data_pretrain.random_resized_crop_box(240, 320, g)
        want = F.interpolate(img[None, :, top : top + ch, left : left + cw], size=(32, 32), mode="bicubic",
                             antialias=True, align_corners=False)[0].clamp(0, 1)  # fmt: skip
        if torch.rand(1, generator=g).item() < 0.5:
            want = want.flip(-1)
        assert torch.equal(out, normalize(want, (0.5,) * 3, (0.25,) * 3))


def warm_scene(h: int = 160, w: int = 200, seed: int = 0) -> tuple[np.ndarray, list[tuple]]:
    """A cool background with a horizontal gradient and noise, and three warm objects (x, y, w, h)."""
    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:h, 0:w][1]
    img = 0.15 + 0.1 * xx / w + rng.normal(0, 0.02, (h, w))
    objects = [(20, 30, 45, 60), (110, 40, 60, 50), (60, 100, 40, 45)]
    for x, y, ow, oh in objects:
        img[y : y + oh, x : x + ow] = 0.75 + rng.normal(0, 0.02, (oh, ow))
    return np.clip(ndimage.gaussian_filter(img, 0.7), 0, 1), objects


def iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


def test_unip_rois_covers_the_warm_objects_and_every_box_passes_pads_filters(tmp_path, capsys):
    msip = tmp_path / "MSIP"
    scenes = {}
    for subset, seed in (("ds1", 0), ("ds2", 1)):
        img, objects = warm_scene(seed=seed)
        (msip / subset / "thermal").mkdir(parents=True)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(msip / subset / "thermal" / "0001.png")
        scenes[subset] = (img.shape, objects)
    (msip / "ds2" / "thermal" / "0002.png").write_bytes(b"not a png")
    out = tmp_path / "rois"
    assert rois_cli.main(["--images", str(msip), "--out", str(out), "--num-workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "1 unreadable images skipped" in captured.out and "0002.png" in captured.err
    for subset, ((h, w), objects) in scenes.items():
        boxes = rois.read_proposals(out / subset / "roi" / "0001.txt").tolist()
        assert boxes, subset
        for x, y, bw, bh in boxes:
            assert bw >= 40 and bh >= 40 and max(bw / bh, bh / bw) <= 3
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
            assert len({tuple(b) for b in boxes}) == len(boxes)
        for obj in objects:
            assert max(iou(obj, b) for b in boxes) >= 0.7, (subset, obj, boxes)
    # A second run keeps the files (an interrupted run continues); --overwrite recomputes them.
    target = out / "ds1" / "roi" / "0001.txt"
    os.utime(target, (1, 1))
    assert rois_cli.main(["--images", str(msip), "--out", str(out), "--num-workers", "1"]) == 0
    assert target.stat().st_mtime == 1
    # Other settings would keep proposals made with the old ones: refused, unless --overwrite.
    capsys.readouterr()
    assert (
        rois_cli.main(["--images", str(msip), "--out", str(out), "--num-workers", "1", "--scale", "50"]) == 2
    )
    assert "made with other settings (scale: " in capsys.readouterr().err and target.stat().st_mtime == 1
    assert rois_cli.main(["--images", str(msip), "--out", str(out), "--num-workers", "1", "--overwrite"]) == 0
    assert target.stat().st_mtime > 1 and not list(out.glob("previous-*"))  # recomputed in place


def test_region_filters_drop_small_thin_and_repeated_boxes():
    regions = [
        (0, 0, 50, 50, 2000),
        (0, 0, 50, 50, 2500),  # the same box again
        (0, 0, 50, 50, 599),  # region of fewer than 600 pixels (its box is larger than the region)
        (0, 0, 39, 80, 2000),  # a side under 40 px
        (0, 0, 130, 43, 3000),  # aspect over 3
        (5, 5, 120, 40, 3000),  # aspect exactly 3
    ]
    assert proposals.keep(regions) == [(0, 0, 50, 50), (5, 5, 120, 40)]


def test_unip_rois_refuses_an_empty_folder_and_names_sharing_a_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rois_cli.main(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    img = np.zeros((48, 48), np.uint8)
    Image.fromarray(img).save(tmp_path / "x.a.png")
    Image.fromarray(img).save(tmp_path / "x.b.png")
    assert rois_cli.main(["--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "share the proposal file" in err and "x.txt" in err and not (tmp_path / "o").exists()


def test_unip_rois_speaks_the_one_grammar(tmp_path, capsys):
    """Issue 21: a bad option is one line (it was the whole usage), the old --num-workers works with
    a notice, and its resolved options given back as --config parse to the same options."""
    import json

    assert rois_cli.main(["--images", "x", "--out", "o", "--bogus"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "unip-rois: error: unrecognized arguments: --bogus (see unip-rois --help)"
    ]
    opts = rois_cli.COMMAND.parse(["--images", "x", "--out", "o", "--num-workers", "2", "--min-side", "30"])
    assert (opts.workers, opts.min_side, opts.overwrite) == (2, 30, False)
    assert "--num-workers is deprecated; use --workers" in capsys.readouterr().err
    cfg = tmp_path / "rois.json"
    cfg.write_text(json.dumps(rois_cli.COMMAND.record(opts)))
    assert rois_cli.COMMAND.parse(["--config", str(cfg)]) == opts
