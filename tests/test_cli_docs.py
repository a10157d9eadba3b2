"""docs/cli.md's options table is what the commands' declarations give (issue 21)."""

from unip_train import cli_docs


def test_docs_cli_table_is_current():
    assert cli_docs.main(["--check"]) == 0, "docs/cli.md is out of date: run python -m unip_train.cli_docs"


def test_table_has_a_row_per_option_and_a_column_per_command():
    cmds = cli_docs.commands()
    assert any(c.prog == "unip-analyze" for c in cmds)
    text = cli_docs.DOC.read_text()
    table = text.split(cli_docs.START)[1].split(cli_docs.END)[0]
    header = table.splitlines()[1]
    for c in cmds:
        assert f"`{c.prog}`" in header
        for s in c.specs:
            assert f"| `{s.flag}` |" in table
