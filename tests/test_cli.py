"""The `ovml` console script as a user meets it: help, version, exit codes, one-line errors."""

import subprocess
import sys

OVML = [sys.executable, "-m", "ovml.cli"]
COMMANDS = ["generate-text", "embed-text", "train-adapter", "embed-images", "eval", "run", "predict"]


def ovml(*args, cwd=None):
    return subprocess.run([*OVML, *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    result = ovml("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_version():
    result = ovml("--version")
    assert result.returncode == 0 and result.stdout.startswith("ovml ")


def test_train_adapter_help_explains_sigma():
    result = ovml("train-adapter", "--help")
    assert result.returncode == 0 and "sigma*sqrt(d)" in " ".join(result.stdout.split())


def test_help_shows_defaults_and_bracketed_text():
    text = " ".join(ovml("train-adapter", "--help").stdout.split())
    assert "[default: 0.16]" in text and "[section]" in text


def test_unknown_config_key_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "ovml.toml"
    config.write_text("[train_adapter]\nnosie = 0.1\n")
    result = ovml("train-adapter", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'nosie' in [train_adapter]" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_takes_exactly_its_configs_fields_and_shows_their_defaults():
    import dataclasses

    import typer

    from ovml.cli import app
    from ovml.pipeline.settings import STAGES

    commands = typer.main.get_command(app).commands
    for stage in STAGES:
        params = {p.name: getattr(p, "help", None) or "" for p in commands[stage.command].params}
        fields = [f for f in dataclasses.fields(stage.config) if f.metadata["cli"]]
        assert set(params) - {"config", "json_out"} == {f.name for f in fields}, stage.command
        for f in fields:
            if f.metadata["shown"] or (f.default not in (None, "", dataclasses.MISSING) and f.type != "bool"):
                shown = f.metadata["shown"] or f.default
                assert f"[default: {shown}]" in params[f.name], (stage.command, f.name)
