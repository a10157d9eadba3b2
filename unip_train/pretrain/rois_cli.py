"""``unip-rois``: offline object proposals for ``unip-pretrain --method pad`` (method.md section 7).

    unip-rois --images /data/MSIP --out /data/MSIP_rois

Writes PAD's proposal files, ``OUT/<subset>/roi/<stem>.txt`` with one ``x,y,w,h`` line per box, for
every image under ``--images`` (``IMAGES/<subset>/thermal/<stem>.png`` in MSIP's layout). ``--out``
may be ``--images`` itself: that is PAD's own layout. Existing files are kept, so running the same
command again continues an interrupted run (no ``--resume`` needed); ``--overwrite`` recomputes them
in place (they are derived from the images alone, and ``--out`` may be the image folder, so nothing
is moved aside). Needs scikit-image (``pip install 'unip-toolkit[rois]'``).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from unip_analysis import command, output_folder
from unip_analysis.errors import ImageError, SpecError
from unip_analysis.images import find_images, read_image

from .. import runs
from .proposals import ProposalSettings, propose, require_scikit_image
from .rois import proposal_file, write_proposals

PROG = "unip-rois"
_D = ProposalSettings()


@dataclass(kw_only=True)
class RoisOptions:
    """Every option of ``unip-rois``, declared once (:mod:`unip_analysis.command`)."""

    images: Path = command.option(help="folder of images, searched recursively", group="data", metavar="DIR")
    out: Path = command.out("root of the proposal files (may be --images itself: PAD's own layout)")
    scale: float = command.option(_D.scale, help="Felzenszwalb scale", group="proposals", metavar="S")
    sigma: float = command.option(_D.sigma, help="Felzenszwalb smoothing", group="proposals", metavar="S")
    min_size: int = command.option(
        _D.min_size, help="Felzenszwalb minimum region (pixels)", group="proposals", metavar="N"
    )
    min_area: int = command.option(
        _D.min_area, help="keep regions of at least N pixels", group="proposals", metavar="N"
    )
    min_side: int = command.option(
        _D.min_side, help="keep boxes with both sides at least N pixels", group="proposals", metavar="N"
    )
    max_aspect: float = command.option(
        _D.max_aspect, help="keep boxes whose longer side is at most R x the shorter", group="proposals",
        metavar="R",
    )  # fmt: skip
    workers: int | None = command.workers(
        "processes computing proposals; 0 or 1: in this process (default: every core available)"
    )
    overwrite: bool = command.option(
        False,
        help="recompute the proposal files that exist (without it they are kept, so that running the same "
        "command again continues an interrupted run)",
        group="run",
    )
    progress: bool = command.progress()
    debug: bool = command.debug()


COMMAND = command.Command(
    PROG,
    RoisOptions,
    description="Selective-search object proposals for PAD's RoI crops, written as PAD's x,y,w,h files.",
    epilog=__doc__.split("\n\n", 1)[1],
)


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


def rois_run(args: RoisOptions) -> output_folder.Run:
    """The proposal settings and the image folder. Nothing is moved aside (the files are recomputed in
    place, and --out may be the image folder), so the record lists no files of its own."""
    options = {f: getattr(args, f) for f in RoisOptions.__dataclass_fields__}
    return output_folder.Run(PROG, output_folder.identity(options), (), what="proposals")


def run(args: RoisOptions) -> dict:
    require_scikit_image()  # fail early, before listing thousands of files
    settings = ProposalSettings(
        args.scale, args.sigma, args.min_size, args.min_area, args.min_side, args.max_aspect
    )
    workers = args.workers if args.workers is not None else max(1, runs.default_num_workers(device=None))
    # Proposals kept from before must come from the same settings: the folder's record says which.
    folder = output_folder.check(
        args.out, rois_run(args), resume=not args.overwrite, overwrite=args.overwrite
    )
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
    folder.begin()
    jobs = [(img, t, settings) for t, img in targets.items() if args.overwrite or not t.exists()]
    print(f"{len(images)} images; {len(images) - len(jobs)} already have proposals; computing {len(jobs)}")
    counts, unreadable, tic = [], [], time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _Serial()
    with pool, tqdm(total=len(jobs), desc="proposals", unit="image", disable=not args.progress) as bar:
        for done, (image, n) in enumerate(pool.imap_unordered(_one, jobs, chunksize=8), start=1):
            bar.update(1)
            if n is None:
                unreadable.append(image)
                tqdm.write(f"{PROG}: warning: unreadable image skipped: {image}", file=sys.stderr)
            else:
                counts.append(n)
            if not args.progress and done % 1000 == 0:
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
    """Console entry point: 0 done, 2 bad input."""
    return command.main(COMMAND, run_quietly, argv)


def run_quietly(args: RoisOptions) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
