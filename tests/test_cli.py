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


@pytest.mark.parametrize("flag, value", [("--max-steps", "0"), ("--max-steps", "-2"), ("--epochs", "0"),
                                         ("--epochs", "-1"), ("--batch-size", "0"), ("--max-bad-fraction", "1.5")])
def test_train_refuses_counts_that_would_train_nothing(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r"), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_unusable_devices_are_clear_errors(tmp_path, capsys, command):
    import torch

    args = {"train": ["train", "--config", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")],
            "eval": ["eval", str(tmp_path / "model.safetensors"), "--data", str(tmp_path)]}[command]
    assert main(args + ["--device", "tpu"]) == 2
    assert "--device 'tpu': not a device clinvla can use; pass cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda"]) == 2
        assert "--device cuda: CUDA is unavailable here" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_cli_default_bad_fraction_is_the_library_default():
    from clinvla_engine import cli
    from clinvla_engine.data.dataset import DEFAULT_MAX_BAD_FRACTION

    assert cli.DEFAULT_MAX_BAD_FRACTION == DEFAULT_MAX_BAD_FRACTION
    from clinvla_engine.config import ConfigError, TrainConfig, load_config

    assert TrainConfig().max_bad_fraction == DEFAULT_MAX_BAD_FRACTION
    with pytest.raises(ConfigError, match="max_bad_fraction must be between 0 and 1"):
        load_config({"preset": "tiny", "train": {"max_bad_fraction": 1.5}})
