"""An output folder belongs to one run: what made it is recorded in ``OUT/run.json``.

Every ``unip-*`` command that writes into ``--out`` describes its run (:class:`Run`): the command,
its identity (the options that change what it writes, plus the sha256 of every model / checkpoint
it reads) and the top-level names it writes there. :func:`check` decides, before any work, what the
folder allows; :meth:`OutputFolder.begin` then acts on it:

- a new or empty folder (or one holding only files no run of this command writes): a new run;
- the same run (same command, same identity): continued where the command continues (``--resume``,
  ``unip-predict`` skipping the images done), otherwise refused unless ``--overwrite``;
- this command with other settings: refused unless ``--overwrite``;
- another command's run, an input folder or a folder inside one: always refused;
- ``--overwrite``: only the files the record lists move into ``OUT/previous-<time>/``; never an input,
  never the working directory or the home folder.

A folder written before run records existed (files but no ``run.json``) is read as before: the
command's own marker files mean a run of it (its outputs are its files); inputs never move.

The record is written (atomically) before the files it lists, so an interrupted run still names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import SpecError
from .files import atomic_write_text, sha256_file

RECORD = "run.json"
RECORD_FORMAT = "unip-run/1"
PREVIOUS_PREFIX = "previous-"
# Options that steer the process only: never part of a run's identity.
RUN_ONLY = ("out", "overwrite", "resume", "progress", "debug", "workers", "config", "print_config")

FOLDER_DIGEST_SUFFIXES = (".safetensors", ".bin", ".json")

State = Literal["new", "continue", "replace"]


@dataclass(frozen=True)
class Run:
    """What one command run writes into its folder. ``outputs``: the top-level names (files or
    folders) it may write; ``inputs``: the files and folders it reads (never moved, never written
    into); ``markers``: the names that mean a run of this command in a folder without ``run.json``
    (default: ``outputs``)."""

    command: str
    identity: Mapping[str, Any]
    outputs: Sequence[str]
    inputs: Sequence[str | Path] = ()
    markers: Sequence[str] | None = None
    what: str = "a run"


def _version() -> str:
    from . import __version__

    return __version__


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes. A folder (a transformers model, a pre-training run): of
    the weights and descriptions at its top (``*.safetensors``, ``*.bin``, ``*.json`` but its
    ``run.json``), by name; resumable checkpoints, logs and earlier runs do not count."""
    path = Path(path)
    if path.is_dir():
        parts = [
            f"{p.name}={sha256_file(p)}"
            for p in sorted(path.iterdir())
            if p.is_file() and p.suffix in FOLDER_DIGEST_SUFFIXES and p.name != RECORD
        ]
        return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return "sha256:" + sha256_file(path)


def identity(
    options: Mapping[str, Any],
    skip: Iterable[str] = (),
    digests: Iterable[str | Path | None] = (),
    paths: Iterable[str] = (),
) -> dict[str, Any]:
    """A run's identity: ``options`` (but :data:`RUN_ONLY` and ``skip``) as JSON values, the options
    named in ``paths`` made absolute (the same run from another folder reads the same files), plus
    ``digests``: ``{absolute path: sha256}`` of the model / checkpoint files the run reads."""
    dropped = set(RUN_ONLY) | set(skip)
    absolute = set(paths)
    ident = {
        k: (os.path.abspath(v) if k in absolute and isinstance(v, str | Path) else v)
        for k, v in options.items()
        if k not in dropped
    }
    files = {os.path.abspath(p): file_digest(p) for p in digests if p is not None and Path(p).exists()}
    if files:
        ident["digests"] = files
    return _plain(ident)


def _plain(value: Any) -> Any:
    """As JSON reads it back, so a recorded identity compares equal to a fresh one."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for k in keys[:3]:
        if k == "digests":
            parts.append("the model / checkpoint files: other sha256")
        else:
            parts.append(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}")
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return "; ".join(parts) + more


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def read_record(out: str | Path) -> dict | None:
    """``OUT/run.json`` as a dict, or None where there is none."""
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(
            f"{path}: the run record is not valid JSON ({e}); move the folder's files away or choose another --out"
        ) from None
    if not isinstance(rec, dict) or not isinstance(rec.get("command"), str):
        raise SpecError(f"{path}: not a unip run record (no 'command'); choose another --out")
    return rec


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _protected(out: Path) -> str | None:
    here = out.resolve()
    for name, place in (("the working directory", Path.cwd()), ("your home folder", Path.home())):
        if here == place.resolve():
            return name
    if here == Path(here.anchor):
        return "the file system's root"
    return None


@dataclass
class OutputFolder:
    """What :func:`check` found; :meth:`begin` moves the old run aside (``replace``) and writes the
    record. ``state``: new, continue (the same run goes on) or replace."""

    path: Path
    run: Run
    state: State
    record: dict | None = None
    legacy: bool = False  # a run of this command from before run records (no run.json)
    to_move: list[str] = field(default_factory=list)
    aside: Path | None = None

    def begin(self) -> Path | None:
        """Move the old run's own files aside (``replace``), make the folder, write ``run.json``
        listing what this run writes; returns the ``previous-<time>/`` folder or None."""
        if self.state == "replace" and self.to_move:
            self.aside = move_aside(self.path, self.to_move)
        self.path.mkdir(parents=True, exist_ok=True)
        kept = self.record if self.state == "continue" and self.record is not None else None
        self._write(list(kept.get("files", [])) if kept else [], kept)
        return self.aside

    def claim(self, *names: str) -> None:
        """Add top-level names to the record before writing them (the outputs are listed already)."""
        claim(self.path, *names)

    def _write(self, files: list[str], previous: dict | None) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        doc = {
            "format": RECORD_FORMAT,
            "command": self.run.command,
            "version": _version(),
            "identity": _plain(self.run.identity),
            "files": sorted(set(files) | set(self.run.outputs)),
            "created": (previous or {}).get("created", now),
            "updated": now,
        }
        atomic_write_text(self.path / RECORD, json.dumps(doc, indent=2) + "\n")


def claim(out: str | Path, *names: str) -> None:
    """List more top-level names in ``OUT/run.json`` before writing them (names known only while the
    run goes, such as ``checkpoint-EPOCH.pt``)."""
    rec = read_record(out)
    if rec is None:
        return
    files = list(rec.get("files", []))
    new = [n for n in names if n not in files]
    if new:
        rec["files"] = sorted(files + new)
        atomic_write_text(Path(out) / RECORD, json.dumps(rec, indent=2) + "\n")


def spec_file(text: str | Path | None) -> Path | None:
    """The file a checkpoint spec names (``PATH``, ``FAMILY:ARCH:PATH``...; paths may hold ':'),
    or None (a name of timm's, a download)."""
    if text is None:
        return None
    parts = str(text).split(":")
    for i in range(len(parts)):
        candidate = Path(":".join(parts[i:]))
        if candidate.is_file() or candidate.is_dir() and i > 0:
            return candidate
    return None


def check(
    out: str | Path,
    run: Run,
    *,
    resume: bool = False,
    overwrite: bool = False,
    can_resume: bool = True,
    continue_legacy: bool = True,
) -> OutputFolder:
    """What ``out`` allows for ``run`` (nothing is changed yet); refuses with one line (SpecError).

    ``resume``: continue the same run if the folder holds it (``--resume``, or ``unip-predict``
    which always continues its own run); ``can_resume``: whether the command continues at all;
    ``continue_legacy``: whether a run of this command without ``run.json`` may be continued (its
    identity cannot be compared)."""
    out = Path(out)
    cmd, what = run.command, run.what
    if resume and overwrite:
        raise SpecError(
            "--resume and --overwrite together: continue the run (--resume) or replace it (--overwrite)"
        )
    if out.exists() and not out.is_dir():
        raise SpecError(f"{out}: --out exists and is not a folder; pass a folder path")
    here = out.resolve()
    inputs = [Path(p) for p in run.inputs]
    for p in inputs:
        folder = p.resolve()
        if here == folder or (folder.is_dir() and here.is_relative_to(folder)):
            where = "is" if here == folder else "lies inside"
            raise SpecError(
                f"{out}: --out {where} the input {'folder' if folder.is_dir() else 'file'} {p}; {cmd} does not "
                "write into its inputs: choose a folder outside it"
            )
    if overwrite and run.outputs and (place := _protected(out)):
        raise SpecError(
            f"--out {out} is {place}: --overwrite would move files out of it; give the run a folder of its own"
        )
    entries = (
        {p.name for p in out.iterdir() if not p.name.startswith(PREVIOUS_PREFIX)} if out.is_dir() else set()
    )
    rec = read_record(out) if RECORD in entries else None
    legacy = False
    if rec is not None:
        if rec["command"] != cmd:
            raise SpecError(
                f"{out} holds a {rec['command']} run ({RECORD}); {cmd} does not write into another command's "
                "folder: choose another --out"
            )
        owned = set(rec.get("files", [])) | {RECORD}
        foreign = sorted(n for n in run.outputs if n in entries and n not in owned)
        if foreign:
            raise SpecError(
                f"{out}: {', '.join(foreign)} there was not written by this {cmd} run ({RECORD} does not list it); "
                "move it away or choose another --out"
            )
        same = _plain(rec.get("identity", {})) == _plain(run.identity)
        state = _decide(
            out, what, same, resume, overwrite, can_resume, _changed(rec.get("identity", {}), run.identity)
        )
    else:
        markers = list(run.markers if run.markers is not None else run.outputs)
        found = sorted(m for m in markers if m in entries)
        if not found:
            foreign = sorted(n for n in run.outputs if n in entries)
            if foreign:
                raise SpecError(
                    f"{out} holds {', '.join(foreign)} not written by {cmd} (no {RECORD}); choose another --out"
                )
            return OutputFolder(out, run, "new")
        legacy = True
        owned = {n for n in run.outputs if n in entries}
        if resume and can_resume and not overwrite and not continue_legacy:
            raise SpecError(
                f"{out} holds {what} ({', '.join(found)}) from before run records ({RECORD}): which settings made it "
                f"is unknown; pass --overwrite to replace it (its files are moved to {out}/{PREVIOUS_PREFIX}<time>/) "
                "or choose another --out"
            )
        state = _decide(out, what, True, resume, overwrite, can_resume, "", found)
    # A run that writes in place (no outputs of its own to move) leaves the old record to be rewritten.
    to_move = sorted(n for n in owned if n in entries) if run.outputs else []
    if state == "replace":
        for name in to_move:
            for p in inputs:
                if _inside(p.resolve(), (out / name).resolve()):
                    raise SpecError(
                        f"{out / name} holds the input {p}: --overwrite would move it; move the input out of "
                        "--out first, or choose another --out"
                    )
    return OutputFolder(out, run, state, rec, legacy, to_move)


def _decide(
    out: Path,
    what: str,
    same: bool,
    resume: bool,
    overwrite: bool,
    can_resume: bool,
    changed: str,
    found: Sequence[str] = (),
) -> State:
    if overwrite:
        return "replace"
    aside = f"the old files are moved to {out}/{PREVIOUS_PREFIX}<time>/"
    if not same:
        raise SpecError(
            f"{out} holds {what} made with other settings ({changed}); pass --overwrite to replace it ({aside}), "
            "or choose another --out"
        )
    if resume and can_resume:
        return "continue"
    hint = "pass --resume to continue it or --overwrite" if can_resume else "pass --overwrite"
    held = f" ({', '.join(found)})" if found else ""
    raise SpecError(
        f"{out} already holds {what}{held}; {hint} to replace it ({aside}), or choose another --out"
    )


def open_out(out: str | Path, run: Run, **how: Any) -> OutputFolder:
    """:func:`check` then :meth:`OutputFolder.begin`: the folder ready for ``run``."""
    folder = check(out, run, **how)
    folder.begin()
    return folder


def move_aside(out: str | Path, names: Iterable[str]) -> Path:
    """Move the entries ``names`` of ``out`` (those that exist) into a new ``out/previous-<time>/``;
    returns that folder. Nothing else in ``out`` moves."""
    out = Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out / f"{PREVIOUS_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = out / f"{PREVIOUS_PREFIX}{stamp}-{n}"
    aside.mkdir()
    for name in sorted(set(names)):
        item = out / name
        if name.startswith(PREVIOUS_PREFIX) or not (item.exists() or item.is_symlink()):
            continue
        os.replace(item, aside / name)
    return aside
