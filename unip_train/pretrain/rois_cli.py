"""``unip-rois``: offline object proposals for ``unip-pretrain --method pad`` (method.md section 7).

    unip-rois --images /data/MSIP --out /data/MSIP_rois

Writes PAD's proposal files, ``OUT/<subset>/roi/<stem>.txt`` with one ``x,y,w,h`` line per box, for
every image under ``--images`` (``IMAGES/<subset>/thermal/<stem>.png`` in MSIP's layout). ``--out``
may be ``--images`` itself: that is PAD's own layout. Existing files are kept (an interrupted run
continues) unless ``--overwrite``. Needs scikit-image (``pip install 'unip-toolkit[rois]'``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from unip_analysis.errors import ImageError, SpecError, UnipError, error_line
from unip_analysis.images import find_images, read_image

from .. import runs
from .proposals import ProposalSettings, propose, require_scikit_image
from .rois import proposal_file, write_proposals

PROG = "unip-rois"


def build_parser() -> argparse.ArgumentParser:
    d = ProposalSettings()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Selective-search object proposals for PAD's RoI crops, written as PAD's x,y,w,h files.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=Path, required=True, help="folder of images, searched recursively")
    p.add_argument("--out", type=Path, required=True, help="root of the proposal files (may be --images)")
    p.add_argument("--scale", type=float, default=d.scale, help=f"Felzenszwalb scale ({d.scale:g})")
    p.add_argument("--sigma", type=float, default=d.sigma, help=f"Felzenszwalb smoothing ({d.sigma:g})")
    p.add_argument("--min-size", type=int, default=d.min_size, help=f"Felzenszwalb min region ({d.min_size})")
    p.add_argument(
        "--min-area", type=int, default=d.min_area, help=f"keep regions of >= N pixels ({d.min_area})"
    )
    p.add_argument(
        "--min-side", type=int, default=d.min_side, help=f"keep boxes with both sides >= N px ({d.min_side})"
    )
    p.add_argument(
        "--max-aspect",
        type=float,
        default=d.max_aspect,
        help=f"keep boxes with aspect <= R ({d.max_aspect:g})",
    )
    p.add_argument(
        "--num-workers",
        "--workers",
        type=int,
        default=max(1, runs.default_num_workers(device=None)),
        help="processes",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute files that exist")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p  # fmt: skip


def _one(job: tuple[Path, Path, ProposalSettings]) -> tuple[str, int | None]:
    """(image, number of proposals written), or (image, None) if it cannot be read."""
    image, target, settings = job
    try:
        img = read_image(image).permute(1, 2, 0).numpy()
    except ImageError:
        return str(image), None
    boxes = propose(img, settings)
    write_proposals(target, boxes)
    return str(image), len(boxes)


def run(args: argparse.Namespace) -> dict:
    require_scikit_image()  # fail early, before listing thousands of files
    settings = ProposalSettings(
        args.scale, args.sigma, args.min_size, args.min_area, args.min_side, args.max_aspect
    )
    if args.num_workers < 1:
        raise SpecError(f"--num-workers must be at least 1, got {args.num_workers}")
    images = find_images(args.images)
    targets: dict[Path, Path] = {}
    for image in images:
        target = proposal_file(args.out, args.images, image)
        if target in targets:
            raise SpecError(
                f"{image} and {targets[target]} share the proposal file {target} (PAD names it by the "
                "image name up to its first dot); rename one of them"
            )
        targets[target] = image
    jobs = [(img, t, settings) for t, img in targets.items() if args.overwrite or not t.exists()]
    print(f"{len(images)} images; {len(images) - len(jobs)} already have proposals; computing {len(jobs)}")
    counts, unreadable, tic = [], [], time.perf_counter()
    with (
        multiprocessing.get_context("spawn").Pool(args.num_workers)
        if args.num_workers > 1
        else _Serial() as pool
    ):
        for done, (image, n) in enumerate(pool.imap_unordered(_one, jobs, chunksize=8), start=1):
            if n is None:
                unreadable.append(image)
                print(f"{PROG}: warning: unreadable image skipped: {image}", file=sys.stderr, flush=True)
            else:
                counts.append(n)
            if done % 1000 == 0:
                print(f"{done}/{len(jobs)} images ({done / (time.perf_counter() - tic):.1f}/s)", flush=True)
    summary = {
        "images": len(images),
        "computed": len(counts),
        "kept": len(images) - len(jobs),
        "unreadable": len(unreadable),
        "proposals_per_image": sum(counts) / len(counts) if counts else 0.0,
    }
    print(
        f"wrote {len(counts)} proposal files under {args.out} ({summary['proposals_per_image']:.1f} boxes per "
        f"image; {len(unreadable)} unreadable images skipped)"
    )
    return summary


class _Serial:
    """The Pool interface in this process (one worker: no spawn cost, tracebacks stay readable)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap_unordered(self, fn, jobs, chunksize: int = 1):
        return map(fn, jobs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args)
        return 0
    except UnipError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
