"""The command line: help, overrides, and one-line errors instead of tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest

from melodjinn.cli.main import COMMANDS, compose, main


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert command.summary in line


def test_every_command_has_a_composable_config_and_importable_function():
    for name, command in COMMANDS.items():
        overrides = ["target=codec"] if name == "bench" else []
        cfg = compose(name, overrides)
        assert "seed" in cfg and "threads" in cfg, name
        assert callable(command.function), name


@pytest.mark.parametrize(
    "args, expected",
    [
        (["render-world", "out=x", "no_such_key=1"], "no_such_key"),
        (["render-world", "out=x", "world=no_such_world"], "no_such_world"),
        (["render-world", "out=x", "world.num_drums=abc"], "num_drums"),
        (["render-world", "out=x", "world.num_drums=99"], "num_drums"),
        (["render-world", "out=x", "threads=-3"], "threads"),
        (["render-world", "out=x", "clips=[1,"], "clips"),
        (["no-such-command"], "no-such-command"),
        (["bench", "no_such_target"], "no_such_target"),
        # the training recipes' shared schedule checks, before any data is made
        (["train-world", "out=x", "train.batch_size=0"], "train.batch_size=0"),
        (["train-world", "out=x", "train.lr=0"], "train.lr=0.0"),
        (["train-world", "out=x", "train.eval_every=0"], "train.eval_every=0"),
        (["train-prior", "checkpoint=drums", "out=x", "train.steps=-1"], "train.steps=-1"),
        (["train-codec", "out=x", "train.steps=100"], "warmup_steps < steps"),
        (["demo", "seconds=0", "out=x"], "seconds=0"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_it(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err_lines) == 1, captured.err
    assert expected in err_lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "x").exists()  # nothing written before the error


def test_missing_required_value_is_named(capsys):
    assert main(["render-world"]) == 2
    assert "out" in capsys.readouterr().err


def test_console_script_prints_cfg_without_running():
    exe = Path(sys.executable).parent / "melodjinn"
    result = subprocess.run([str(exe), "render-world", "out=somewhere", "world.num_drums=5", "--cfg"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "num_drums: 5" in result.stdout
    assert "out: somewhere" in result.stdout
