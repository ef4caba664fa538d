"""Foreseeable faults (issue 22) are one line, the right exit code, and cost no finished work: every case runs the
CLI on a copy of one complete run directory and asserts the exit code, a single line without a traceback, the
words that name the problem, and that every artifact the run had is byte-identical afterwards (sha256).

The cases are samples of classes, and the classes are tested as classes too: every numeric flag of every command
out of its range (tests/test_settings.py holds the table's own tests), every input file of the wrong kind, every
artifact damaged for every command that reads it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from helpers import artifact_hashes, build_finished_run, flip_bytes, truncate
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline import llm
from ovml.pipeline.settings import RANGES, Range
from ovml.pipeline.testbed import TestbedConfig
from ovml.stages.embed_images import EmbedImagesConfig
from ovml.stages.embed_text import EmbedTextConfig
from ovml.stages.evaluate import EvalConfig
from ovml.stages.generate_text import GenerateTextConfig
from ovml.stages.predict import PredictConfig
from ovml.stages.search import SearchConfig
from ovml.stages.train_adapter import TrainAdapterConfig


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_clip) -> tuple[Path, Path]:
    return build_finished_run(tmp_path_factory.mktemp("faults"), tiny_clip)


@dataclass
class Run:
    """A private copy of the finished run, and what a case needs to name on the command line."""

    dir: Path
    labels: Path
    work: Path
    clip: str

    def cli(self, command: str, *args: str, device: bool = True) -> list[str]:
        """`command` on this run with its CLIP (and the CPU, for commands that take --device)."""
        return [command, "--run-dir", str(self.dir), "--clip", self.clip, *(["--device", "cpu"] if device else []),
                *args]


@pytest.fixture
def run(finished_run, tmp_path, tiny_clip) -> Run:
    shutil.copytree(finished_run[0], tmp_path / "run")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    return Run(tmp_path / "run", finished_run[1], tmp_path, tiny_clip)


def invoke(argv: list[str]):
    return CliRunner().invoke(app, argv)


def assert_one_line(result, exit_code: int, *words: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
    for word in words:
        assert word in " ".join(result.output.split()), result.output


def nan_adapter(run: Run) -> None:
    """adapter/model.safetensors with every weight NaN, as a diverged training run saved it before issue 22."""
    path = run.dir / "adapter" / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path))


def nan_text_embedding(run: Run) -> None:
    """One caption's text embedding NaN in text_emb/part-00000.parquet, the rest of the part as embed-text wrote it."""
    path = run.dir / "text_emb" / "part-00000.parquet"
    table = pq.read_table(path)
    matrix = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    matrix[0] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), path)


def unvouched(run: Run) -> None:
    """No manifest vouches for the files any more (moved in from elsewhere): each reader's own checks count."""
    (run.dir / "manifest.json").unlink()


def edit_manifest(run: Run, change: Callable[[dict], None]) -> None:
    path = run.dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def no_retries(monkeypatch) -> None:
    monkeypatch.setattr(llm, "OpenAIBackend", functools.partial(llm.OpenAIBackend, retries=0))


@dataclass
class Case:
    name: str
    argv: Callable[[Run], list[str]]
    words: tuple[str, ...]  # fragments of the one-line error
    setup: Callable[[Run, object], None] = lambda run, monkeypatch: None
    exit_code: int = 2


CASES = [
    # item 2: a diverged training run must not replace a good adapter
    Case("train-adapter --lr 1e30 without validation",
         lambda r: r.cli("train-adapter", "--force", "--lr", "1e30", "--epochs", "3", "--val-fraction", "0"),
         ("training diverged", "lower --lr", "nothing was saved")),
    Case("train-adapter --lr 1e30 with validation",
         lambda r: r.cli("train-adapter", "--force", "--lr", "1e30", "--epochs", "3", "--val-fraction", "0.5"),
         ("training diverged", "lower --lr")),
    Case("train-adapter on a text_emb part holding NaN", lambda r: r.cli("train-adapter", "--force"),
         ("text_emb/part-00000.parquet holds non-finite embeddings", "embed-text --force"),
         setup=lambda r, mp: (nan_text_embedding(r), unvouched(r))),
    Case("eval on an adapter whose weights are NaN", lambda r: r.cli("eval", "--dataset", "folder", "--force"),
         ("holds NaN or infinite weights", "train-adapter --force"),
         setup=lambda r, mp: (nan_adapter(r), unvouched(r))),
    Case("predict --json on an adapter whose weights are NaN",
         lambda r: ["predict", str(r.work / "photo.png"), "--labels", "cat,dog", "--json", *r.cli("predict")[1:]],
         ("holds NaN or infinite weights",), setup=lambda r, mp: (nan_adapter(r), unvouched(r))),
    # item 3: search verifies what it reads, and a dataset name never leaves its folder
    Case("search on a truncated index.faiss", lambda r: r.cli("search", "a cat", "--dataset", "folder"),
         ("index.faiss is not the file `ovml embed-images --dataset folder` wrote",),
         setup=lambda r, mp: truncate(r.dir / "images/folder/index.faiss")),
    Case("search on a truncated items.parquet", lambda r: r.cli("search", "a cat", "--dataset", "folder"),
         ("items.parquet is not the file `ovml embed-images --dataset folder` wrote",),
         setup=lambda r, mp: truncate(r.dir / "images/folder/items.parquet")),
    Case("search on a damaged dataset.json", lambda r: r.cli("search", "a cat", "--dataset", "folder"),
         ("dataset.json is not the file `ovml embed-images --dataset folder` wrote",),
         setup=lambda r, mp: (r.dir / "images/folder/dataset.json").write_text("{")),
    Case("search on a truncated index.faiss no manifest vouches for",
         lambda r: r.cli("search", "a cat", "--dataset", "folder"), ("index.faiss is damaged or not a FAISS index",),
         setup=lambda r, mp: (truncate(r.dir / "images/folder/index.faiss"), unvouched(r))),
    Case("search on a truncated items.parquet no manifest vouches for",
         lambda r: r.cli("search", "a cat", "--dataset", "folder"), ("items.parquet is damaged or not a parquet file",),
         setup=lambda r, mp: (truncate(r.dir / "images/folder/items.parquet"), unvouched(r))),
    Case("search on a dataset.json of the wrong shape no manifest vouches for",
         lambda r: r.cli("search", "a cat", "--dataset", "folder"), ("dataset.json is damaged",),
         setup=lambda r, mp: ((r.dir / "images/folder/dataset.json").write_text("[]"), unvouched(r))),
    # item 4: eval verifies dataset.json before it reads it
    Case("eval on a dataset.json edited to lack its clip", lambda r: r.cli("eval", "--dataset", "folder"),
         ("dataset.json is not the file `ovml embed-images --dataset folder` wrote",),
         setup=lambda r, mp: (r.dir / "images/folder/dataset.json").write_text('{"images": 3}')),
    # item 7: foreseeable faults of the run directory and the manifest
    Case("--run-dir that is a file", lambda r: ["eval", "--run-dir", str(r.work / "photo.png"), "--dataset", "folder"],
         ("photo.png is a file, not a directory",)),
    Case("--run-dir under a file", lambda r: r.cli("train-adapter")[:1] + ["--run-dir", str(r.work / "photo.png/run")],
         ("is under", "photo.png, which is a file, not a directory")),
    Case("a manifest whose stage record is a string", lambda r: r.cli("eval", "--dataset", "folder"),
         ("manifest.json is damaged (its record of train_adapter is not an ovml stage record)",),
         setup=lambda r, mp: edit_manifest(r, lambda m: m["stages"].update(train_adapter="finished"))),
    Case("a manifest whose outputs are a list", lambda r: r.cli("train-adapter"),
         ("manifest.json is damaged (its record of embed_text is not an ovml stage record)",),
         setup=lambda r, mp: edit_manifest(r, lambda m: m["stages"]["embed_text"].update(outputs=[]))),
    Case("a damaged .staging/train_adapter/commit.json", lambda r: r.cli("train-adapter"),
         ("commit.json is damaged", "run `ovml train-adapter` again"),
         setup=lambda r, mp: ((r.dir / ".staging/train_adapter").mkdir(parents=True),
                              (r.dir / ".staging/train_adapter/commit.json").write_text('{"record": "x"'))),
    Case("train-adapter --device tpu", lambda r: r.cli("train-adapter", "--force")[:-3] + ["--device", "tpu"],
         ("--device must be one of cpu, cuda, cuda:N or auto, got 'tpu'",)),
    Case("embed-text --device tpu (not blamed on CLIP weights)",
         lambda r: r.cli("embed-text", "--force")[:-3] + ["--device", "tpu"], ("--device must be one of",)),
    # item 13: messages that name the real problem and the repair that costs least
    Case("generate-text --num-shards 0", lambda r: ["generate-text", "--run-dir", str(r.dir), "--labels",
                                                    str(r.labels), "--num-shards", "0"],
         ("--num-shards must be at least 1, got 0",)),
    Case("a damaged caption part", lambda r: r.cli("embed-text", "--force"),
         ("captions/part-00000.parquet is not the file `ovml generate-text` wrote",
          "run the same `ovml generate-text", "never --force"),
         setup=lambda r, mp: flip_bytes(r.dir / "captions/part-00000.parquet")),
    # item 14: values out of range change nothing (the pool is not archived: captions/ hashes the same)
    Case("generate-text --max-tokens 0",
         lambda r: ["generate-text", "--run-dir", str(r.dir), "--labels", str(r.labels), "--max-tokens", "0"],
         ("--max-tokens must be at least 1, got 0",)),
    Case("generate-text --temperature 9", lambda r: ["generate-text", "--run-dir", str(r.dir), "--labels",
                                                     str(r.labels), "--temperature", "9"],
         ("--temperature must be in [0, 2], got 9.0",)),
    Case("generate-text --top-p 0", lambda r: ["generate-text", "--run-dir", str(r.dir), "--labels", str(r.labels),
                                               "--top-p", "0"], ("--top-p must be in (0, 1], got 0.0",)),
    Case("train-adapter --patience -1", lambda r: r.cli("train-adapter", "--patience", "-1"),
         ("--patience must be at least 1, got -1",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fault_is_one_line_with_its_exit_code_and_keeps_every_artifact(case, run, monkeypatch):
    case.setup(run, monkeypatch)
    before = artifact_hashes(run.dir)
    result = invoke(case.argv(run))
    assert_one_line(result, case.exit_code, *case.words)
    assert artifact_hashes(run.dir) == before


def test_search_with_a_dataset_name_that_climbs_out_reads_and_writes_nothing_of_another_run(run):
    other = run.work / "other"
    shutil.copytree(run.dir, other)
    everything = {p: p.stat().st_mtime_ns for p in run.work.rglob("*")}
    result = invoke(run.cli("search", "a cat", "--dataset", "../../other/images/folder"))
    assert_one_line(result, 2, "unknown dataset '../../other/images/folder'")
    assert {p: p.stat().st_mtime_ns for p in run.work.rglob("*")} == everything


def test_a_password_in_base_url_is_never_shown(run, monkeypatch):
    no_retries(monkeypatch)
    result = invoke(["generate-text", "--run-dir", str(run.dir), "--labels", str(run.labels), "--backend", "openai",
                     "--base-url", "http://ann:s3cret-pw@127.0.0.1:9/v1", "--per-label", "3"])
    assert_one_line(result, 2, "no answer from http://ann:***@127.0.0.1:9/v1")
    assert "s3cret-pw" not in result.output


def test_a_password_in_base_url_is_kept_out_of_run_json_and_its_log(run, monkeypatch):
    no_retries(monkeypatch)
    config = run.work / "ovml.toml"
    config.write_text(f'run_dir = "{run.dir}"\n[generate_text]\nlabels = "{run.labels}"\nbackend = "openai"\n'
                      'base_url = "http://ann:s3cret-pw@127.0.0.1:9/v1"\nper_label = 3\n')
    result = invoke(["run", "--config", str(config), "--json"])
    assert result.exit_code == 1 and "http://ann:***@127.0.0.1:9/v1" in result.output
    assert "s3cret-pw" not in result.output
    logs = list((run.dir / "logs").glob("*.log"))
    assert logs and not any("s3cret-pw" in log.read_text() for log in logs)


def test_run_with_a_learning_rate_that_diverges_names_the_learning_rate(run):
    config = run.work / "ovml.toml"
    config.write_text(f'run_dir = "{run.dir}"\nclip = "{run.clip}"\ndevice = "cpu"\n'
                      f'[generate_text]\nlabels = "{run.labels}"\nper_label = 2\npart_size = 4\n'
                      '[train_adapter]\nlr = 1e30\nhidden = 16\nepochs = 3\nval_fraction = 0.0\n')
    before = artifact_hashes(run.dir)
    result = invoke(["run", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "training diverged" in " ".join(result.output.split()) and "finite" not in result.output
    assert "Traceback" not in result.output
    assert artifact_hashes(run.dir) == before


def test_run_without_a_generate_text_section_names_the_config_key_not_a_flag(run):
    (run.dir / "captions").rename(run.work / "captions")  # nothing to reuse: generate-text must run
    config = run.work / "ovml.toml"
    config.write_text(f'run_dir = "{run.dir}"\n')
    result = invoke(["run", "--config", str(config)])
    assert result.exit_code == 2  # a config error, found by the checks before any stage runs
    assert 'labels = "FILE" in the [generate_text] section' in " ".join(result.output.split()), result.output


def test_a_ray_address_nothing_answers_is_one_line_within_seconds(run):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs ray (the ray extra)")
    started = time.monotonic()
    result = invoke(run.cli("embed-text", "--force", "--engine", "ray", "--ray-address", "127.0.0.1:1"))
    assert_one_line(result, 2, "cannot join the Ray cluster at 127.0.0.1:1")
    assert time.monotonic() - started < 30  # ray.init alone retried for minutes


# -- the classes ------------------------------------------------------------------------------------------------

CONFIGS = {"generate-text": GenerateTextConfig, "embed-text": EmbedTextConfig, "train-adapter": TrainAdapterConfig,
           "embed-images": EmbedImagesConfig, "eval": EvalConfig, "predict": PredictConfig, "search": SearchConfig,
           "train-testbed": TestbedConfig}


def _flags_with_a_range() -> list[tuple[str, str, str]]:
    """(command, --flag, a value just outside its range) for every numeric option of every command."""
    cases = []
    for command in typer.main.get_command(app).commands.values():
        hints = typing.get_type_hints(CONFIGS[command.name]) if command.name in CONFIGS else {}
        for param in command.params:
            if param.param_type_name != "option" or param.name not in RANGES:
                continue
            bounds: Range = RANGES[param.name]
            number = float if "float" in str(hints[param.name]) else int
            step = 1 if number is int else 0.5
            values = ([] if bounds.low is None else [bounds.low if bounds.low_open else bounds.low - step]) + (
                [] if bounds.high is None else [bounds.high if bounds.high_open else bounds.high + step])
            cases += [(command.name, param.opts[0], str(number(v))) for v in values]
            if number is float:
                cases.append((command.name, param.opts[0], "nan"))
    return cases


@pytest.mark.parametrize(("command", "flag", "value"), _flags_with_a_range(), ids=lambda x: str(x))
def test_every_numeric_flag_out_of_range_is_refused_before_anything_happens(command, flag, value, run):
    argv = {"predict": [str(run.work / "photo.png"), "--labels", "cat"], "search": ["a cat"],
            "generate-text": ["--labels", str(run.labels)]}.get(command, [])
    if command == "train-testbed":
        argv = ["--out", str(run.work / "testbed.safetensors")]
    else:
        argv += ["--run-dir", str(run.dir)]
    before = artifact_hashes(run.dir)
    result = invoke([command, *argv, flag, value])
    assert_one_line(result, 2, f"{flag} must be")
    assert artifact_hashes(run.dir) == before and not (run.work / "testbed.safetensors").exists()


def test_the_range_table_covers_every_flag_it_should(run):
    assert len(_flags_with_a_range()) >= 60  # the generator above found the flags (none silently skipped)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


WRONG_KINDS = {"directory": (lambda work: work, "is a directory, not a file"),
               "fifo": (lambda work: _fifo(work / "pipe"), "is a FIFO (named pipe), not a file"),
               "/dev/null": (lambda work: Path("/dev/null"), "is a character device, not a file")}

INPUT_FILES = {  # where a command reads a file the user names, and the words that name it
    "labels file": lambda r, p: ["generate-text", "--run-dir", str(r.dir), "--labels", str(p)],
    "config file": lambda r, p: ["eval", "--config", str(p), "--run-dir", str(r.dir)],
    "image": lambda r, p: ["predict", str(p), "--labels", "cat", *r.cli("predict")[1:]],
    "labels file ": lambda r, p: ["predict", str(r.work / "photo.png"), "--labels-file", str(p),
                                  *r.cli("predict")[1:]],
    "CLIP checkpoint": lambda r, p: ["embed-text", "--run-dir", str(r.dir), "--clip", f"ovml-tiny:{p}", "--force"],
    "--cooccurrence file": lambda r, p: ["generate-text", "--run-dir", str(r.dir), "--labels", str(r.labels),
                                         "--sampling", "cooccurrence", "--cooccurrence", str(p)],
    "--root": lambda r, p: ["embed-images", "--run-dir", str(r.dir), "--clip", r.clip, "--dataset", "folder",
                            "--root", str(p), "--force"],
}


@pytest.mark.parametrize("kind", WRONG_KINDS)
@pytest.mark.parametrize("what", INPUT_FILES)
def test_an_input_file_of_the_wrong_kind_is_named_as_what_it_is(what, kind, run):
    make, words = WRONG_KINDS[kind]
    path = make(_dir(run.work / "w"))
    before = artifact_hashes(run.dir)
    result = invoke(INPUT_FILES[what](run, path))
    assert_one_line(result, 2, f"{what.strip()} {path} {words}")
    assert artifact_hashes(run.dir) == before


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


READERS = {  # each command, and the artifacts it reads
    "embed-text": (lambda r: r.cli("embed-text", "--force"),
                   ("captions/part-00000.parquet", "captions/vocabulary.json")),
    "train-adapter": (lambda r: r.cli("train-adapter", "--force"),
                      ("text_emb/part-00000.parquet", "labels/train.parquet", "captions/part-00000.parquet",
                       "captions/vocabulary.json")),
    "eval": (lambda r: r.cli("eval", "--dataset", "folder", "--force"),
             ("images/folder/index.faiss", "images/folder/items.parquet", "images/folder/dataset.json",
              "adapter/model.safetensors", "adapter/config.json")),
    "search": (lambda r: r.cli("search", "a cat", "--dataset", "folder"),
               ("images/folder/index.faiss", "images/folder/items.parquet", "images/folder/dataset.json",
                "adapter/model.safetensors", "adapter/config.json")),
    "predict": (lambda r: ["predict", str(r.work / "photo.png"), "--labels", "cat", *r.cli("predict")[1:]],
                ("adapter/model.safetensors", "adapter/config.json")),
}
DAMAGED = [(command, artifact, vouched) for command, (_, artifacts) in READERS.items() for artifact in artifacts
           for vouched in (True, False)]


@pytest.mark.parametrize(("command", "artifact", "vouched"), DAMAGED,
                         ids=lambda x: x if isinstance(x, str) else ("vouched" if x else "unvouched"))
def test_every_artifact_truncated_is_one_line_for_every_command_that_reads_it(command, artifact, vouched, run):
    truncate(run.dir / artifact)
    if not vouched:
        unvouched(run)
    before = artifact_hashes(run.dir)
    result = invoke(READERS[command][0](run))
    expected = "is not the file" if vouched else artifact.rpartition("/")[2]
    assert_one_line(result, 2, expected)
    assert artifact_hashes(run.dir) == before
