"""The `minift` command: every subcommand answers --help with an example, and `icl` is wired to its engine."""

import pytest

from minift.cli import build_parser, main

SUBCOMMANDS = ["generate", "demo", "finetune", "eval", "icl", "quantize", "merge", "export", "plan"]


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


def test_an_os_error_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """The system refusing a write (no space, no permission) ends like bad input: one line, exit 2."""
    import errno

    import minift.export as export

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(export, "quantize", full_disk)
    assert main(["quantize", "--model", "smollm2-135m", "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minift: error:") and "No space left on device" in lines[0]
    assert str(tmp_path / "out" / "model.safetensors") in lines[0]


def test_closed_pipe_ends_quietly():
    """`minift plan ... | head -1`: the reader goes away before minift writes; no 'minift: error' and no traceback."""
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-m", "minift", "plan", "--model", "7b", "--gpus", "8", "--method",
                                "lora", "--seq-len", "512", "--batch", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert stderr == ""


@pytest.mark.parametrize("argv, expected", [
    (["nosuch"], "minift: error: argument command: invalid choice: 'nosuch'"),
    (["generate", "--model", "x"], "minift: error: generate: the following arguments are required: --prompt"),
    (["generate", "--model", "x", "--prompt", "y", "--max-new-tokens", "many"],
     "minift: error: generate: argument --max-new-tokens: invalid int value: 'many'"),
    ([], "minift: error: the following arguments are required: command"),
])
def test_argparse_errors_are_one_line_too(argv, expected, capsys):
    """Usage errors caught by argparse itself print one `minift: error:` line (not the usage block), exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert err.rstrip().endswith("--help)")
