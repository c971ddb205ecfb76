"""The `minift` command: every subcommand answers --help with an example, and `icl` is wired to its engine."""

import pytest

from minift.cli import build_parser, main

SUBCOMMANDS = ["generate", "demo", "finetune", "eval", "icl", "quantize", "merge", "export"]


def test_every_subcommand_is_registered():
    actions = [a for a in build_parser()._actions if a.dest == "command"]
    assert set(SUBCOMMANDS) <= set(actions[0].choices)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_shows_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_icl_bad_input_exits_nonzero_with_a_clear_message(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n')
    status = main(["icl", "--model", "smollm2-135m", "--train", str(train), "--test", str(train), "--shots", "1"])
    assert status != 0
    assert "train.jsonl:2" in capsys.readouterr().err


def test_python_dash_m_minift_is_the_command():
    """`python -m minift` (how torchrun starts a program) runs the same CLI; a fresh interpreter is the point."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "minift", "finetune", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "usage: minift finetune" in done.stdout and "qlora" in done.stdout
