"""The range table of every numeric setting (pipeline/settings.py): complete, and applied from every source."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from ovml.pipeline.config import build_config
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.settings import RANGES, check_settings
from ovml.pipeline.testbed import TestbedConfig
from ovml.stages.embed_images import EmbedImagesConfig
from ovml.stages.embed_text import EmbedTextConfig
from ovml.stages.evaluate import EvalConfig
from ovml.stages.generate_text import GenerateTextConfig
from ovml.stages.predict import PredictConfig
from ovml.stages.search import SearchConfig
from ovml.stages.train_adapter import TrainAdapterConfig

CONFIGS = [GenerateTextConfig, EmbedTextConfig, TrainAdapterConfig, EmbedImagesConfig, EvalConfig, PredictConfig,
           SearchConfig, TestbedConfig]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_setting_of_every_stage_has_a_range(config):
    hints = typing.get_type_hints(config)
    numeric = [f.name for f in dataclasses.fields(config)
               if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))]
    assert numeric and [name for name in numeric if name not in RANGES] == []


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_default_is_within_its_range(config):
    check_settings(config())


def test_a_value_from_the_config_file_is_named_where_it_was_written():
    with pytest.raises(OvmlError, match=r"'patience' in \[train_adapter\] of demo.toml must be at least 1, got -2"):
        build_config(TrainAdapterConfig, "train_adapter", {"train_adapter": {"patience": -2}}, source="demo.toml")


def test_a_flag_overriding_the_file_is_named_as_a_flag():
    with pytest.raises(OvmlError, match=r"^--top-p must be in \(0, 1\], got 1.5$"):
        build_config(GenerateTextConfig, "generate_text", {"generate_text": {"top_p": 0.5}}, {"top_p": 1.5})


def test_infinity_is_refused_wherever_a_number_is_taken():
    with pytest.raises(OvmlError, match="--lr must be a finite number, got inf"):
        check_settings(TrainAdapterConfig(lr=float("inf")))


def test_an_unknown_device_is_refused_before_any_model_loads():
    with pytest.raises(OvmlError, match="--device must be one of cpu, cuda, cuda:N or auto, got 'gpu'"):
        check_settings(EvalConfig(device="gpu"))


def test_the_python_api_checks_ranges_as_the_cli_does(tmp_path):
    from ovml.stages.train_adapter import train_adapter

    with pytest.raises(OvmlError, match="--patience must be at least 1, got -1"):
        train_adapter(TrainAdapterConfig(run_dir=tmp_path / "run", patience=-1))
    assert not (tmp_path / "run").exists()
