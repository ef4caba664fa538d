"""A run directory owns its CLIP: the first stage that embeds records it, later commands use it without --clip."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import pytest
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.rundir import RunDir
from ovml.pipeline.settings import DEFAULT_CLIP
from ovml.stages.embed_images import EmbedImagesConfig, embed_images


@pytest.fixture
def embedded_run(tmp_path, tiny_clip):
    """A run directory whose first embedding stage (embed-images of a folder) ran with the tiny CLIP."""
    run = tmp_path / "run"
    embed_images(EmbedImagesConfig(run_dir=run, clip=tiny_clip, device="cpu", dataset="folder",
                                   root=str(helpers.folder_release(tmp_path / "data")), workers=0))
    return run


def test_a_new_run_directory_uses_the_default_clip(tmp_path):
    assert RunDir(tmp_path / "new").clip(None) == DEFAULT_CLIP


def test_the_first_embedding_stage_records_its_clip_in_the_manifest(embedded_run, tiny_clip):
    assert json.loads((embedded_run / "manifest.json").read_text())["clip"] == tiny_clip
    assert RunDir(embedded_run).clip(None) == tiny_clip


def test_another_clip_is_a_one_line_error_naming_both(embedded_run, tiny_clip):
    with pytest.raises(OvmlError, match=f"made with CLIP '{tiny_clip}', not 'ovml-tiny:random'") as e:
        RunDir(embedded_run).clip("ovml-tiny:random")
    assert "\n" not in str(e.value)


def test_the_same_checkpoint_by_another_path_is_the_same_clip(embedded_run, tiny_clip, tmp_path, monkeypatch):
    arch, _, checkpoint = tiny_clip.partition(":")
    (tmp_path / "link.safetensors").symlink_to(checkpoint)
    monkeypatch.chdir(tmp_path)
    assert RunDir(embedded_run).clip(f"{arch}:link.safetensors") == tiny_clip  # the recorded spelling is kept


def test_another_checkpoint_file_of_the_same_architecture_is_another_clip(embedded_run, tiny_clip, tmp_path):
    arch, _, checkpoint = tiny_clip.partition(":")
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(checkpoint).read_bytes())
    with pytest.raises(OvmlError, match="made with CLIP"):
        RunDir(embedded_run).clip(f"{arch}:{copy}")


def test_a_run_directory_from_before_the_rule_is_known_by_its_stages_clip(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"embed_text": {"params": {"clip": "A:b"}}}}))
    assert RunDir(tmp_path).clip(None) == "A:b"


def test_predict_without_clip_uses_the_run_directorys(embedded_run, tiny_clip):
    helpers.build_adapter(embedded_run, tiny_clip)
    photo = sorted((embedded_run.parent / "data" / "imgs").glob("a.jpg"))[0]
    result = CliRunner().invoke(app, ["predict", str(photo), "--labels", "cat,sky", "--json",
                                      "--run-dir", str(embedded_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["labels"]


def test_predict_with_another_clip_exits_2_naming_both(embedded_run, tiny_clip):
    helpers.build_adapter(embedded_run, tiny_clip)
    photo = embedded_run.parent / "data" / "imgs" / "a.jpg"
    result = CliRunner().invoke(app, ["predict", str(photo), "--labels", "cat,sky", "--run-dir", str(embedded_run),
                                      "--clip", "ovml-tiny:random"])
    assert result.exit_code == 2
    assert tiny_clip in result.output and "ovml-tiny:random" in result.output
    assert "Traceback" not in result.output
