"""The TOML config: sections per stage, CLI overrides, one-line errors naming the bad key."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from ovml.pipeline.config import build_config, read_config_file
from ovml.pipeline.errors import OvmlError


@dataclass
class DemoConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    noise: float = 0.04
    epochs: int = 10
    loss: Literal["asl", "bce"] = "asl"
    limit: int | None = None


def write(tmp_path, text: str) -> dict:
    path = tmp_path / "ovml.toml"
    path.write_text(text)
    return read_config_file(path)


def test_defaults_apply_without_a_file():
    cfg = build_config(DemoConfig, "train_adapter", {})
    assert cfg == DemoConfig()


def test_section_values_and_shared_top_level_keys_are_used(tmp_path):
    data = write(tmp_path, 'clip = "ovml-tiny:random"\nrun_dir = "runs/x"\n[train_adapter]\nnoise = 0.1\n')
    cfg = build_config(DemoConfig, "train_adapter", data)
    assert (cfg.clip, cfg.run_dir, cfg.noise) == ("ovml-tiny:random", Path("runs/x"), 0.1)


def test_command_line_overrides_the_file_and_none_means_not_given(tmp_path):
    data = write(tmp_path, "[train_adapter]\nnoise = 0.1\nepochs = 3\n")
    cfg = build_config(DemoConfig, "train_adapter", data, {"noise": 0.0, "epochs": None})
    assert (cfg.noise, cfg.epochs) == (0.0, 3)


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path):
    cfg = build_config(DemoConfig, "train_adapter", write(tmp_path, "[train_adapter]\nnoise = 0\n"))
    assert cfg.noise == 0.0 and isinstance(cfg.noise, float)


def test_unknown_key_is_named(tmp_path):
    data = write(tmp_path, "[train_adapter]\nnosie = 0.1\n")
    with pytest.raises(OvmlError, match=r"unknown key 'nosie' in \[train_adapter\]"):
        build_config(DemoConfig, "train_adapter", data)


def test_wrong_type_is_named(tmp_path):
    data = write(tmp_path, '[train_adapter]\nepochs = "ten"\n')
    with pytest.raises(OvmlError, match=r"'epochs' in \[train_adapter\].* must be an integer, got 'ten'"):
        build_config(DemoConfig, "train_adapter", data)


def test_text_where_a_number_is_expected_is_named(tmp_path):
    data = write(tmp_path, '[train_adapter]\nnoise = "high"\n')
    with pytest.raises(OvmlError, match=r"'noise' in \[train_adapter\].* must be a number, got 'high'"):
        build_config(DemoConfig, "train_adapter", data)


def test_number_where_a_path_is_expected_is_named(tmp_path):
    with pytest.raises(OvmlError, match="'run_dir' in top level of .* must be a path, got 5"):
        build_config(DemoConfig, "train_adapter", write(tmp_path, "run_dir = 5\n"))


def test_value_outside_a_choice_lists_the_choices(tmp_path):
    data = write(tmp_path, '[train_adapter]\nloss = "mse"\n')
    with pytest.raises(OvmlError, match="must be one of 'asl', 'bce'"):
        build_config(DemoConfig, "train_adapter", data)


def test_unknown_section_is_named_with_a_hint(tmp_path):
    with pytest.raises(OvmlError, match=r"unknown section \[train-adapter\].*did you mean \[train_adapter\]"):
        write(tmp_path, "[train-adapter]\nnoise = 0.1\n")


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(OvmlError, match="unknown top-level key 'noise'"):
        write(tmp_path, "noise = 0.1\n")


def test_invalid_toml_is_one_error(tmp_path):
    with pytest.raises(OvmlError, match="not valid TOML"):
        write(tmp_path, "[train_adapter\n")


def test_missing_file_is_one_error(tmp_path):
    with pytest.raises(OvmlError, match="does not exist"):
        read_config_file(tmp_path / "nope.toml")
