"""The command line: help texts, clear errors with exit code 2, nothing overwritten."""
import json

import pytest

from clinvla_engine.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: clinvla" in capsys.readouterr().out


def test_info_reports_what_is_available(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"torch", "cuda", "triton", "extension", "onnxruntime", "tensorrt"} <= set(info)


def test_errors_name_the_input_and_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "a"), "--studies", "0"]) == 2
    assert "studies" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("x")
    assert main(["synth", "--out", str(tmp_path), "--studies", "2", "--quiet"]) == 2
    assert str(tmp_path) in capsys.readouterr().err and (tmp_path / "mine.txt").read_text() == "x"
    assert main(["eval", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--data", str(tmp_path / "void"), "--out", str(tmp_path / "r")]) == 2
    assert "void" in capsys.readouterr().err
