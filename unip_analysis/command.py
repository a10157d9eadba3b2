"""One grammar for every ``unip-*`` command: options declared once, parsed by jsonargparse.

A command declares its options as ONE typed dataclass (``@dataclass(kw_only=True)``) whose fields are
made by :func:`option` (or by the shared declarations below, so that the same concept has the same
name, values, default and help in every command). Everything else comes from that declaration:

- the parser (jsonargparse, which also types values such as ``list[int]`` and ``Literal[...]``);
- ``--config FILE`` (YAML, JSON or TOML; keys are the option names with ``_`` or ``-``; unknown keys
  are refused with the key named; a run's own ``config.json`` reads back as it was written);
- ``--print-config`` (the resolved options as YAML, then exit), the ``--help`` text (every option
  with its help and default), and the options table of ``docs/cli.md`` (:func:`options_table`);
- old spellings kept for one release (``aliases`` / ``deprecated_values``): they work and print a
  one-line deprecation notice.

:func:`main` runs a command: bad input (a bad option or value, a missing file, a refused run folder)
ends every open progress bar, prints one line ``PROG: error: ...`` on its own line and exits 2;
``--debug`` shows the traceback. Output folders follow one rule, :mod:`unip_analysis.output_folder`:
a folder belongs to the run that made it (``run.json``), is continued (``--resume``) or replaced with
its own files moved aside (``--overwrite``), never silently reused.

jsonargparse is the field's choice for this (LightningCLI builds on it). We call its
``add_argument`` per field rather than ``add_class_arguments`` so option names keep the dashes every
``unip-*`` command has always used (``--batch-size``, not ``--batch_size``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import traceback
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from . import output_folder
from .device import DEVICE_HELP, DEVICE_PATTERN, PRECISIONS
from .errors import SpecError, UnipError, error_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "Command", "DEVICE_HELP", "PRECISIONS", "batch_size", "debug", "device", "img_size", "main", "norm",
    "option", "options_table", "out", "overwrite", "precision", "progress", "resume", "seed",
    "workers",
]  # fmt: skip

EXIT_BAD_INPUT = 2
_META = "unip_option"


# --- declaring options ------------------------------------------------------------------------------


def option(
    default: Any = MISSING,
    *,
    help: str,
    group: str = "options",
    aliases: Sequence[str] = (),
    deprecated_values: Mapping[str, str] | None = None,
    metavar: str | None = None,
    const: Any = None,
    check: Callable[[Any], str | None] | None = None,
    default_text: str | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option ``--NAME`` (NAME: the field name with
    dashes). No ``default`` = required. ``aliases``: old spellings (``--crop``) that still work with a
    deprecation notice; an alias ``--old=VALUE`` is an old bare flag that set this option to VALUE
    (``--no-amp=fp32``: ``--no-amp`` reads as ``--precision fp32``); ``deprecated_values``: old values mapped to new ones (``{"none": "fp32"}``).
    ``const``: the value of the bare option (``--resume`` alone). ``check(value)`` returns an error
    text or None. ``default_text``: how the default reads in ``--help`` when it is derived.
    List options take ``--opt a,b,c`` (or a JSON list); with ``repeat`` each use adds one value
    (``--checkpoint A --checkpoint B``), the first on the command line replacing a ``--config`` list."""
    meta = {
        _META: {
            "help": help,
            "group": group,
            "aliases": tuple(aliases),
            "deprecated_values": dict(deprecated_values or {}),
            "metavar": metavar,
            "const": const,
            "check": check,
            "default_text": default_text,
            "repeat": repeat,
        }
    }
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


# Shared declarations: the same concept, the same option in every command that has it.


def out(help: str = "folder for the outputs") -> Any:
    return option(help=help, group="run", metavar="DIR")


def device(default: str = "auto") -> Any:
    return option(default, help=DEVICE_HELP, group="run", check=_check_device)


def precision(
    default: str = "auto", help: str = "", aliases: Sequence[str] = (), extra: Sequence[str] = ()
) -> Any:
    """``--precision``, the shared rule (:mod:`unip_analysis.device`); ``extra``: values of this
    command's own on top (say what they mean in ``help``)."""
    text = "numeric precision: auto (bf16 on CUDA, fp16 where a GPU lacks bf16, fp32 on the CPU), bf16, fp16"
    text += f", fp32 or {' or '.join(extra)}" if extra else " or fp32"
    return option(
        default,
        help=f"{text}{'; ' + help if help else ''}",
        group="run",
        aliases=("--amp", *aliases),
        deprecated_values={"none": "fp32"},
        check=lambda value: _check_precision(value, extra),
    )


def workers(
    help: str = "data loader processes; default: cores / processes, less torch's threads on the CPU",
) -> Any:
    return option(None, help=help, group="run", aliases=("--num-workers",), metavar="N", check=non_negative)


def batch_size(default: int | None, help: str) -> Any:
    return option(default, help=help, group="run", metavar="N", check=positive)


def img_size(default: int | None, help: str, aliases: Sequence[str] = ()) -> Any:
    return option(default, help=help, group="data", metavar="PX", check=positive, aliases=aliases)


def norm(default: str, help: str = "") -> Any:
    text = "image normalisation: imagenet, infrared, infmix, or MEAN,STD (0-1 or 0-255 scale)"
    return option(default, help=f"{text}{'; ' + help if help else ''}", group="data", metavar="PRESET")


def seed(help: str = "random seed (data order, augmentation, initialisation)") -> Any:
    return option(0, help=help, group="run", metavar="N")


def resume(help: str = "") -> Any:
    text = "continue the run in --out exactly from its checkpoint.pt (or from the checkpoint CKPT given)"
    return option(
        None, help=f"{text}{'; ' + help if help else ''}", group="run", metavar="[CKPT]", const="auto"
    )


def overwrite() -> Any:
    return option(
        False,
        help="replace the run in --out: the files it wrote (listed in --out/run.json) move into --out/previous-<time>/, "
        "not deleted; inputs never move",
        group="run",
    )


def progress() -> Any:
    return option(True, help="progress bars (--no-progress: none)", group="run")


def debug() -> Any:
    return option(False, help="show tracebacks of errors", group="run")


def _check_device(value: str) -> str | None:
    if not DEVICE_PATTERN.fullmatch(str(value)):
        return f"{value!r}: expected {DEVICE_HELP}"
    return None


def _check_precision(value: str, extra: Sequence[str] = ()) -> str | None:
    choices = (*PRECISIONS, *extra)
    return None if value in choices else f"{value!r}: expected one of {', '.join(choices)}"


def positive(value: Any) -> str | None:
    return None if value is None or value >= 1 else f"must be at least 1, got {value}"


def non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else f"must not be negative, got {value}"


# --- the command --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One option as the parser and the docs see it."""

    name: str  # field name
    flag: str  # --name-with-dashes
    type: Any
    default: Any
    required: bool
    help: str
    group: str
    aliases: tuple[str, ...]
    deprecated_values: dict[str, str]
    metavar: str | None
    const: Any
    check: Callable[[Any], str | None] | None
    default_text: str | None
    repeat: bool

    @property
    def is_flag(self) -> bool:
        # ``bool | None``: a flag whose unset value (None) means "derived" (--x / --no-x / neither).
        return self.type is bool or self.type == (bool | None)

    @property
    def is_list(self) -> bool:
        text = str(self.type)
        return "list[" in text or "tuple[" in text or getattr(self.type, "__origin__", None) in (list, tuple)


def specs(options: type) -> list[Spec]:
    """The options a dataclass declares, in declaration order."""
    hints = get_type_hints(options)
    out_ = []
    for f in dataclasses.fields(options):
        meta = f.metadata.get(_META)
        if meta is None:
            raise TypeError(f"{options.__name__}.{f.name} is not declared with command.option()")
        if f.default is not MISSING:
            default, required = f.default, False
        elif f.default_factory is not MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        out_.append(
            Spec(
                f.name, "--" + f.name.replace("_", "-"), hints[f.name], default, required, meta["help"],
                meta["group"], meta["aliases"], meta["deprecated_values"], meta["metavar"], meta["const"],
                meta["check"], meta["default_text"], meta["repeat"],
            )
        )  # fmt: skip
    return out_


class Command:
    """A command: its name, its options dataclass, and the parser built from them."""

    def __init__(
        self,
        prog: str,
        options: type,
        description: str,
        epilog: str | None = None,
        ignored_keys: Sequence[str] = (),
    ):
        self.prog, self.options, self.description, self.epilog = prog, options, description, epilog
        # Keys a run's config.json records that are not options (world_size, say): skipped when read back.
        self.ignored_keys = tuple(ignored_keys)
        self.specs = specs(options)
        self.by_name = {s.name: s for s in self.specs}
        self.by_flag = {s.flag: s for s in self.specs}

    # -- parser ------------------------------------------------------------------------------------

    def parser(self, check_required: bool = True):
        """The jsonargparse parser; ``check_required=False`` leaves required options to the caller
        (:meth:`parse` with ``--config``: they may come from the file or from the command line)."""
        from jsonargparse import ActionYesNo, ArgumentParser

        p = ArgumentParser(
            prog=self.prog, description=self.description, epilog=self.epilog, exit_on_error=False,
            default_env=False,
        )  # fmt: skip
        p.add_argument(
            "--config", metavar="FILE", help="YAML, JSON or TOML file of option values; flags override it"
        )
        p.add_argument(
            "--print-config", action=ActionYesNo(no_prefix="no-"), default=False,
            help="print the resolved options as YAML and exit",
        )  # fmt: skip
        groups: dict[str, Any] = {}
        for s in self.specs:
            g = groups.get(s.group) or groups.setdefault(s.group, p.add_argument_group(s.group))
            help_text = s.help + (f" (default: {s.default_text})" if s.default_text else "")
            if s.is_flag:
                g.add_argument(s.flag, action=ActionYesNo(no_prefix="no-"), default=s.default, help=help_text)
                continue
            kwargs: dict[str, Any] = {"type": s.type, "help": help_text, "metavar": s.metavar}
            if s.required and check_required:
                kwargs["required"] = True
            elif s.required:
                kwargs["default"] = None
            else:
                kwargs["default"] = s.default
            if s.const is not None:
                kwargs.update(nargs="?", const=s.const)
            g.add_argument(s.flag, **kwargs)
        return p

    # -- parsing -----------------------------------------------------------------------------------

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """The options the command line (and ``--config``) give, as the options dataclass."""
        argv = self._translate(list(sys.argv[1:] if argv is None else argv))
        config_path, argv = _take_config(argv)
        # With --config, required options may come from the file or the flags: checked once both are in.
        parser = self.parser(check_required=config_path is None)
        namespace = None
        try:
            if config_path is not None:
                namespace = parser.parse_object(self._file_values(config_path), defaults=True)
            ns = parser.parse_args(argv, namespace=namespace)
        except (Exception, SystemExit) as e:  # jsonargparse raises ArgumentError / its own errors
            if isinstance(e, SystemExit):
                raise
            raise SpecError(f"{self._concise(_one_line(str(e)))} (see {self.prog} --help)") from None
        missing = [s.name for s in self.specs if s.required and getattr(ns, s.name) is None]
        if missing:
            raise SpecError(
                f"the following arguments are required: {', '.join(missing)} (see {self.prog} --help)"
            )
        values = {s.name: getattr(ns, s.name) for s in self.specs}
        for s in self.specs:
            v = values[s.name]
            if isinstance(v, str) and v in s.deprecated_values:
                values[s.name] = s.deprecated_values[v]
                _notice(self.prog, f"{s.flag} {v} is deprecated; use {s.flag} {s.deprecated_values[v]}")
            if s.check is not None and values[s.name] is not None:
                problem = s.check(values[s.name])
                if problem:
                    raise SpecError(f"{s.flag}: {problem} (see {self.prog} --help)")
        if getattr(ns, "print_config", False):
            print(_yaml({k: _plain_value(v) for k, v in values.items()}), end="")
            raise SystemExit(0)
        return self.options(**values)

    def _concise(self, text: str) -> str:
        """jsonargparse's type error (the Union subtypes tried, one by one) as ``--opt 'v': expected T``."""
        key = re.search(r'Parser key "(\w+)"', text)
        spec = self.by_name.get(key.group(1)) if key else None
        if spec is None or "value: " not in text:
            return text
        given = text.rsplit("value: ", 1)[1]  # the last one: the value as the user gave it
        return f"{spec.flag} {given!r}: expected {_describe(spec.type)}"

    def _translate(self, argv: list[str]) -> list[str]:
        """Old spellings -> current ones (one notice each); list options in jsonargparse's form."""
        aliases = {a: s for s in self.specs for a in s.aliases if "=" not in a}
        flag_values = {
            a.split("=")[0]: (s, a.split("=", 1)[1]) for s in self.specs for a in s.aliases if "=" in a
        }
        out_: list[str] = []
        seen: set[str] = set()
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            name, eq, value = arg.partition("=")
            if arg in flag_values:  # an old bare flag that set a value (--no-amp)
                s, value = flag_values[arg]
                _notice(self.prog, f"{arg} is deprecated; use {s.flag} {value}")
                out_ += [s.flag, value]
                continue
            if name in aliases:
                s = aliases[name]
                _notice(
                    self.prog, f"{name} is deprecated; use {s.flag} (the old name goes in the next release)"
                )
                name = s.flag
            elif name.startswith("--no-") and "--" + name[5:] in aliases and aliases["--" + name[5:]].is_flag:
                s = aliases["--" + name[5:]]
                _notice(self.prog, f"{name} is deprecated; use --no-{s.flag[2:]}")
                name = "--no-" + s.flag[2:]
            spec = self.by_flag.get(name)
            if spec is None or not spec.is_list:
                out_.append(name + eq + value)
                continue
            if not eq:  # --opt VALUE
                if i >= len(argv):
                    out_.append(name)
                    continue
                value, i = argv[i], i + 1
                n = _fixed_length(spec.type)
                rest = argv[i : i + n - 1]
                if (
                    n > 1
                    and "," not in value
                    and len(rest) == n - 1
                    and not any(a.startswith("--") for a in rest)
                ):
                    # The old space-separated form of a fixed-length option (--betas 0.9 0.999).
                    value, i = ",".join([value, *rest]), i + n - 1
                    _notice(self.prog, f"{name} {value.replace(',', ' ')} is deprecated; use {name} {value}")
            if value.lstrip().startswith("["):
                out_ += [name, value]
            elif spec.repeat:
                out_ += [name + ("+" if name in seen else ""), value if name in seen else json.dumps([value])]
            else:
                parts = [p.strip() for p in value.split(",") if p.strip()]
                out_ += [name, "[" + ", ".join(p if _is_number(p) else json.dumps(p) for p in parts) + "]"]
            seen.add(name)
        return out_

    def _file_values(self, path: Path) -> dict[str, Any]:
        raw = read_config_file(path)
        aliases = {a[2:].replace("-", "_"): s for s in self.specs for a in s.aliases if "=" not in a}
        values: dict[str, Any] = {}
        unknown = []
        for key, value in raw.items():
            if key in self.by_name:
                values[key] = value
            elif key in aliases:
                values[aliases[key].name] = _old_value(aliases[key], key, value)
                _notice(self.prog, f"{path}: key {key} is deprecated; use {aliases[key].name}")
            elif key not in self.ignored_keys and key not in ("config", "print_config"):
                unknown.append(key)
        if unknown:
            raise SpecError(
                f"{path}: unknown option(s) {', '.join(sorted(unknown))}; keys are {self.prog}'s option "
                f"names (see {self.prog} --help)"
            )
        return values

    def record(self, options: Any) -> dict[str, Any]:
        """The resolved options as JSON-ready values (what ``config.json`` holds)."""
        return {s.name: _plain_value(getattr(options, s.name)) for s in self.specs}


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a text", bool: "true or false", Path: "a path"}


def _describe(tp: Any) -> str:
    """A type as the error message says it: ``int | None`` -> an integer, ``Literal['a', 'b']`` -> one of a, b."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        inner = " or ".join(dict.fromkeys(_describe(a) for a in args if a is not Ellipsis))
        return f"a comma-separated list ({inner})"
    if args:  # a union: what it takes besides None
        return " or ".join(_describe(a) for a in args if a is not type(None))
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _old_value(spec: Spec, key: str, value: Any) -> Any:
    # Old boolean keys of renamed options (``amp = false``) read as the new option's values.
    if spec.name == "precision" and isinstance(value, bool):
        return "auto" if value else "fp32"
    return value


def _fixed_length(tp: Any) -> int:
    """N for ``tuple[X, ..., X]`` (N items), else 1."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and Ellipsis not in args:
        return len(args)
    return max((_fixed_length(a) for a in args if a is not type(None)), default=1)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _take_config(argv: list[str]) -> tuple[Path | None, list[str]]:
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise SpecError("--config needs a FILE")
            path, i = Path(argv[i + 1]), i + 2
            continue
        if arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return path, rest


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option names (``_`` form) to values from a ``.yaml`` / ``.yml`` / ``.json`` /
    ``.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            f"{path}: --config file not found; pass a .yaml, .json or .toml file of option values"
        )
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise SpecError(f"{path}: --config must end in .yaml, .yml, .json or .toml")
    except SpecError:
        raise
    except Exception as e:  # each format's own parse error
        raise SpecError(f"{path}: cannot parse --config file ({_one_line(str(e))}); fix its syntax") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: --config must hold one mapping of option: value pairs")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _plain_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain_value(v) for v in value]
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _yaml(values: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(values), sort_keys=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _notice(prog: str, text: str) -> None:
    print(f"{prog}: note: {text}", file=sys.stderr, flush=True)


# --- running ----------------------------------------------------------------------------------------


def close_progress_bars() -> None:
    """End every open tqdm bar so that what is printed next stands on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar half torn down by the error itself
            pass


def main(
    command: Command,
    run: Callable[[Any], int | None],
    argv: Sequence[str] | None = None,
    exit_codes: Mapping[type, int] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> int:
    """Parse, then ``run(options)``; its return value (None = 0) is the exit status. Bad input
    (:class:`UnipError` and the types in ``exit_codes``) ends the bars, prints one line, exits 2
    (or the mapped status); ``--debug`` prints the traceback too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug_ = "--debug" in argv
    known = (UnipError, *(exit_codes or {}))
    try:
        options = command.parse(argv)
        debug_ = bool(getattr(options, "debug", debug_))
        status = run(options)
        return int(status or 0)
    except known as e:
        close_progress_bars()
        if debug_:
            traceback.print_exc()
        print(f"{command.prog}: error: {error_line(e)}", file=sys.stderr, flush=True)
        for kind, code in (exit_codes or {}).items():
            if isinstance(e, kind):
                return code
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"{command.prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException:
        close_progress_bars()
        raise
    finally:
        if cleanup is not None:
            cleanup()


# --- output folders: the rule lives in unip_analysis.output_folder (run.json, --resume, --overwrite) ---

PREVIOUS_PREFIX = output_folder.PREVIOUS_PREFIX


# --- docs ---------------------------------------------------------------------------------------------


def options_table(commands: Sequence[Command]) -> str:
    """A Markdown table of every option of every command: one row per option name (the same concept
    has the same name everywhere), one column per command, the default in each cell."""
    names: list[str] = []
    helps: dict[str, str] = {}
    for cmd in commands:
        for s in cmd.specs:
            if s.flag not in names:
                names.append(s.flag)
            # A shared option's meaning: its shortest help (the others add what is particular to a command).
            if s.flag not in helps or len(s.help) < len(helps[s.flag]):
                helps[s.flag] = s.help
    shared = [n for n in names if sum(n in cmd.by_flag for cmd in commands) > 1]
    ordered = shared + [n for n in names if n not in shared]
    head = "| option | " + " | ".join(f"`{c.prog}`" for c in commands) + " | meaning |"
    rule = "|---" * (len(commands) + 2) + "|"
    rows = [head, rule]
    for n in ordered:
        cells = []
        for cmd in commands:
            s = cmd.by_flag.get(n)
            cells.append("-" if s is None else _cell(s))
        rows.append(f"| `{n}` | " + " | ".join(cells) + f" | {_md(helps[n])} |")
    return "\n".join(rows) + "\n"


def _cell(s: Spec) -> str:
    if s.required:
        return "required"
    if s.default_text:
        return _md(s.default_text)
    if s.is_flag:
        return "on" if s.default else "off"
    if s.default is None:
        return "unset"
    return f"`{_md(json.dumps(_plain_value(s.default)) if not isinstance(s.default, str) else s.default)}`"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
