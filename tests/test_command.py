"""The one grammar (unip_analysis.command): declared options, config files, old spellings, one-line
errors after progress bars, and the no-overwrite rule for output folders."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from unip_analysis import command
from unip_analysis.errors import SpecError


@dataclass(kw_only=True)
class Toy:
    images: Path = command.option(help="image folder", group="data")
    layers: list[int] | None = command.option(None, help="1-based layers")
    checkpoint: list[str] = command.option([], help="repeatable", repeat=True)
    img_size: int | None = command.img_size(None, "input size", aliases=("--input-size",))
    precision: str = command.precision()
    device: str = command.device()
    workers: int | None = command.workers()
    resume: str | None = command.resume()
    progress: bool = command.progress()
    debug: bool = command.debug()
    out: Path = command.out()


TOY = command.Command("unip-toy", Toy, description="a toy command")


def test_declared_once_parsed_typed_with_defaults():
    opts = TOY.parse(["--images", "imgs", "--out", "o", "--layers", "4,6,8"])
    assert opts == Toy(images=Path("imgs"), out=Path("o"), layers=[4, 6, 8])
    assert opts.precision == "auto" and opts.device == "auto" and opts.progress and not opts.debug
    assert TOY.parse(["--images", "i", "--out", "o", "--layers", "[1, 2]"]).layers == [1, 2]


def test_repeatable_lists_and_bare_resume():
    opts = TOY.parse(
        ["--images", "i", "--out", "o", "--checkpoint", "a=x:y:z", "--checkpoint", "b=1", "--resume"]
    )
    assert opts.checkpoint == ["a=x:y:z", "b=1"] and opts.resume == "auto"
    assert TOY.parse(["--images", "i", "--out", "o", "--resume", "ck.pt"]).resume == "ck.pt"


def test_flags_take_no_prefix():
    opts = TOY.parse(["--images", "i", "--out", "o", "--no-progress", "--debug"])
    assert not opts.progress and opts.debug


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--images", "i"], "required: out"),
        (["--images", "i", "--out", "o", "--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--images", "i", "--out", "o", "--precision", "fp64"], "--precision: 'fp64': expected one of auto"),
        (["--images", "i", "--out", "o", "--device", "gpu"], "--device: 'gpu': expected cpu, cuda"),
        (["--images", "i", "--out", "o", "--img-size", "0"], "--img-size: must be at least 1"),
        (["--images", "i", "--out", "o", "--workers", "x"], "workers"),
    ],
)
def test_bad_option_or_value_is_one_line(argv, message):
    with pytest.raises(SpecError) as info:
        TOY.parse(argv)
    text = str(info.value)
    assert message in text and "\n" not in text and text.endswith("(see unip-toy --help)") or "--" in text


def test_main_prints_one_line_and_exits_2(capsys):
    def run(opts):
        raise AssertionError("not reached")

    assert command.main(TOY, run, ["--images", "i", "--out", "o", "--precision", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unip-toy: error: --precision: 'x'")


def test_old_spellings_work_and_warn(capsys):
    opts = TOY.parse(
        ["--images", "i", "--out", "o", "--input-size", "64", "--amp", "none", "--num-workers=3"]
    )
    assert opts.img_size == 64 and opts.precision == "fp32" and opts.workers == 3
    err = capsys.readouterr().err
    assert "--input-size is deprecated; use --img-size" in err
    assert "--amp is deprecated; use --precision" in err and "--precision none is deprecated" in err
    assert "--num-workers is deprecated; use --workers" in err


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_config_files_in_three_formats_and_flags_override(tmp_path, suffix):
    values = {"images": "from_file", "out": "o", "layers": [4, 6], "checkpoint": ["a=1"], "img_size": 64}
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    elif suffix == ".yaml":
        path.write_text("images: from_file\nout: o\nlayers: [4, 6]\ncheckpoint:\n  - a=1\nimg-size: 64\n")
    else:
        path.write_text(
            'images = "from_file"\nout = "o"\nlayers = [4, 6]\ncheckpoint = ["a=1"]\nimg_size = 64\n'
        )
    opts = TOY.parse(["--config", str(path), "--layers", "8", "--checkpoint", "b=2", "--checkpoint", "c=3"])
    assert opts.images == Path("from_file") and opts.img_size == 64
    assert opts.layers == [8]  # the command line replaces the file's list
    assert opts.checkpoint == ["b=2", "c=3"]


def test_config_unknown_keys_refused_with_the_key_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": "i", "out": "o", "batchsize": 3}))
    with pytest.raises(SpecError, match=r"c.json: unknown option\(s\) batchsize"):
        TOY.parse(["--config", str(path)])
    ignoring = command.Command("unip-toy", Toy, "toy", ignored_keys=("world_size",))
    path.write_text(json.dumps({"images": "i", "out": "o", "world_size": 2}))
    assert ignoring.parse(["--config", str(path)]).images == Path("i")


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("img_size = \n")
    with pytest.raises(SpecError, match="bad.toml: cannot parse"):
        TOY.parse(["--config", str(bad)])
    with pytest.raises(SpecError, match="none.json: --config file not found"):
        TOY.parse(["--config", str(tmp_path / "none.json")])
    wrong = tmp_path / "w.txt"
    wrong.write_text("images: i\n")
    with pytest.raises(SpecError, match="w.txt: --config must end in"):
        TOY.parse(["--config", str(wrong)])
    typed = tmp_path / "t.json"
    typed.write_text(json.dumps({"images": "i", "out": "o", "img_size": "many"}))
    with pytest.raises(SpecError, match="--img-size 'many': expected an integer"):
        TOY.parse(["--config", str(typed)])


def test_config_required_options_from_the_file_or_the_flags(tmp_path):
    """A required option may come from --config or the command line; missing from both, one line."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": "i", "img_size": 32}))
    opts = TOY.parse(["--config", str(path), "--out", "o"])
    assert (opts.images, opts.out, opts.img_size) == (Path("i"), Path("o"), 32)
    with pytest.raises(
        SpecError, match=r"^the following arguments are required: out \(see unip-toy --help\)$"
    ):
        TOY.parse(["--config", str(path)])
    path.write_text(json.dumps({"images": "i", "out": "o", "precision": "fp64"}))
    with pytest.raises(SpecError, match="--precision: 'fp64': expected one of auto"):
        TOY.parse(["--config", str(path)])


def test_old_config_keys_read_with_a_notice(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"images": "i", "out": "o", "amp": "none", "input_size": 32, "num_workers": 0})
    )
    opts = TOY.parse(["--config", str(path)])
    assert (opts.precision, opts.img_size, opts.workers) == ("fp32", 32, 0)
    assert "key amp is deprecated" in capsys.readouterr().err


def test_record_round_trips_through_config(tmp_path):
    opts = TOY.parse(
        ["--images", "i", "--out", "o", "--layers", "4,6", "--checkpoint", "a=1", "--no-progress"]
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TOY.record(opts)))
    assert TOY.parse(["--config", str(path)]) == opts


def test_print_config_prints_yaml_and_exits(capsys):
    with pytest.raises(SystemExit) as info:
        TOY.parse(["--images", "i", "--out", "o", "--print-config"])
    assert info.value.code == 0
    assert "images: i" in capsys.readouterr().out


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        TOY.parse(["--help"])
    text = capsys.readouterr().out
    for s in TOY.specs:
        assert s.flag in text
    assert "default: auto" in text


def test_an_error_ends_open_progress_bars_first(capsys):
    """Defect 6 of issue 21: the error line stood glued to the bar, then the bar came again."""
    from tqdm import tqdm

    def run(opts):
        bar = tqdm(total=4, desc="epoch 0", file=sys.stderr)
        bar.update(1)
        raise SpecError("none of the 4 pre-training images can be read")

    assert command.main(TOY, run, ["--images", "i", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "unip-toy: error: none of the 4 pre-training images can be read\n" in err
    lines = err.replace("\r", "\n").split("\n")
    assert "unip-toy: error: none of the 4 pre-training images can be read" in lines
    assert err.endswith("can be read\n")  # nothing of the bar after the error


def test_options_table_puts_one_concept_on_one_row():
    @dataclass(kw_only=True)
    class Other:
        device: str = command.device()
        seed: int = command.seed()

    table = command.options_table([TOY, command.Command("unip-other", Other, "other")])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["`--device`"].count("`auto`") == 2
    assert "| - |" in rows["`--images`"]
