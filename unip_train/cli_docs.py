"""``docs/cli.md``: every option of every ``unip-*`` command in one table, generated from the commands'
own declarations (:mod:`unip_analysis.command`), so it cannot drift from ``--help``.

    python -m unip_train.cli_docs            # rewrite the table in docs/cli.md
    python -m unip_train.cli_docs --check    # exit 1 if docs/cli.md is not what the declarations give

``tests/test_cli_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from unip_analysis.command import Command, options_table
from unip_analysis.files import atomic_write_text

# Each command's module and the name of its Command object, in the order of the pipeline.
COMMAND_MODULES = (
    "unip_analysis.cli",
    "unip_train.pretrain.cli",
    "unip_train.pretrain.rois_cli",
    "unip_train.finetune.cli",
    "unip_train.compare.cli",
    "unip_train.predict.cli",
    "unip_train.export.cli",
)
START, END = "<!-- options-table:start -->", "<!-- options-table:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def commands() -> list[Command]:
    """The declared commands (modules not yet ported to the grammar, or absent, are left out)."""
    found = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        cmd = getattr(module, "COMMAND", None)
        if isinstance(cmd, Command):
            found.append(cmd)
    return found


def render(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if START not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {START} / {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unip_train.cli_docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = render(text, options_table(commands()))
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python -m unip_train.cli_docs", file=sys.stderr)
            return 1
        return 0
    if new != text:
        atomic_write_text(DOC, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
