"""--engine ray: the same artifacts as the local engine, the same resume, on a local Ray with 2 CPUs.

Ray starts once for this module (about 10 s) and is shut down at its end; stages join it instead of
starting their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import helpers
import pytest

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.ray_engine import ray_map
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.embed_text import EmbedTextConfig, embed_text
from ovml.stages.generate_text import GenerateTextConfig, generate_text

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'ovml[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def mark_interrupted(run_dir: Path, stage: str) -> None:
    """What a kill leaves in the manifest: the stage "running" with the same fingerprint."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"][stage]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def images_config(run_dir: Path, clip: str, csv_file: Path, **overrides) -> EmbedImagesConfig:
    return EmbedImagesConfig(**{"run_dir": run_dir, "clip": clip, "device": "cpu", "dataset": "folder",
                                "root": str(csv_file), "batch_size": 2, "workers": 0, **overrides})


def test_embed_images_on_ray_writes_the_local_cache_byte_for_byte(tmp_path, tiny_clip, local_ray):
    csv_file = helpers.folder_release(tmp_path / "data")
    embed_images(images_config(tmp_path / "local", tiny_clip, csv_file))
    outcome = embed_images(images_config(tmp_path / "ray", tiny_clip, csv_file, engine="ray"))
    assert outcome.summary["failures"] == 2
    local, on_ray = tree_bytes(tmp_path / "local" / "images"), tree_bytes(tmp_path / "ray" / "images")
    assert {"folder/index.faiss", "folder/items.parquet", "folder/failures.parquet"} <= set(on_ray)
    assert on_ray == local


def test_embed_images_on_ray_resumes_a_killed_local_run_embedding_only_the_missing_chunks(tmp_path, tiny_clip,
                                                                                        local_ray):
    """A FIFO in place of the 4th image blocks the local run there; SIGINT kills it; Ray finishes the rest."""
    data = tmp_path / "data"
    for i in range(5):
        helpers.write_jpeg(data / f"{i}.jpg", 30 * i)
    (data / "labels.csv").write_text("path,labels\n" + "".join(f"{i}.jpg,l{i}\n" for i in range(5)))
    embed_images(images_config(tmp_path / "straight", tiny_clip, data / "labels.csv", batch_size=1))
    (data / "3.jpg").rename(data / "3.jpg.real")
    os.mkfifo(data / "3.jpg")
    cfg = images_config(tmp_path / "resumed", tiny_clip, data / "labels.csv", batch_size=1)
    chunks = tmp_path / "resumed" / "images" / "folder" / "chunks"

    def interrupt_when_blocked():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(chunks.glob("chunk-*.parquet"))) < 3:
            time.sleep(0.05)
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt_when_blocked, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        embed_images(cfg)
    (data / "3.jpg").unlink()
    (data / "3.jpg.real").rename(data / "3.jpg")

    outcome = embed_images(EmbedImagesConfig(**{**cfg.__dict__, "engine": "ray"}))
    assert (outcome.reason, outcome.summary["reused"]) == ("resuming an interrupted run", 3)
    assert tree_bytes(tmp_path / "resumed" / "images") == tree_bytes(tmp_path / "straight" / "images")


def write_captions(run_dir: Path, parts: dict[str, list[str]]) -> None:
    """Captions parts as generate-text writes them (its schema and writer)."""
    import pyarrow as pa

    from ovml.pipeline import atomic
    from ovml.stages.generate_text import CAPTION_SCHEMA

    for name, texts in parts.items():
        rows = [{"caption_id": f"{name}-{i}", "text": text, "labels": ["dog"], "requested": ["dog"],
                 "prompt_id": "p0", "backend": "llama-cpp", "model": "m", "seed": i} for i, text in enumerate(texts)]
        atomic.write_parquet(run_dir / "captions" / name, pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA))
    atomic.write_json(run_dir / "captions" / "vocabulary.json", {"labels": ["dog", "beach"], "synonyms": {}})


CAPTIONS = {"part-00000.parquet": ["a dog", "a dog runs along the beach", "a beach " * 60],
            "part-00001.parquet": ["a wet dog on the beach", "beach"],
            "part-00002.parquet": ["two dogs", "a dog asleep on a beach towel"]}


def text_config(run_dir: Path, clip: str, **overrides) -> EmbedTextConfig:
    return EmbedTextConfig(run_dir=run_dir, clip=clip, device="cpu", batch_size=2, templates="single", **overrides)


def test_embed_text_on_ray_writes_the_local_parts_and_labels_byte_for_byte(tmp_path, tiny_clip, local_ray):
    for run in ("local", "ray"):
        write_captions(tmp_path / run, CAPTIONS)
    embed_text(text_config(tmp_path / "local", tiny_clip))
    outcome = embed_text(text_config(tmp_path / "ray", tiny_clip, engine="ray"))
    assert (outcome.summary["texts"], outcome.summary["truncated"]) == (7, 1)
    for folder in ("text_emb", "labels"):
        assert tree_bytes(tmp_path / "ray" / folder) == tree_bytes(tmp_path / "local" / folder)


def test_embed_text_on_ray_resumes_writing_only_the_missing_parts(tmp_path, tiny_clip, local_ray):
    write_captions(tmp_path, CAPTIONS)
    embed_text(text_config(tmp_path, tiny_clip))
    expected = tree_bytes(tmp_path / "text_emb")
    kept = tmp_path / "text_emb" / "part-00001.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    mark_interrupted(tmp_path, "embed_text")
    for lost in ("part-00000.parquet", "part-00002.parquet"):
        (tmp_path / "text_emb" / lost).unlink()
    outcome = embed_text(text_config(tmp_path, tiny_clip, engine="ray"))
    assert (outcome.reason, outcome.summary["resumed_parts"]) == ("resuming an interrupted run", 1)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert tree_bytes(tmp_path / "text_emb") == expected


class DiesOnce:
    """A worker whose process dies in the middle of its first task, as on a lost node."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def __call__(self, batch):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return batch


def test_a_lost_actor_is_restarted_and_its_work_redone(tmp_path, local_ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor imports nothing from tests/
    items = [{"unit": i, "x": i} for i in range(4)]
    done = dict(ray_map(items, dict.fromkeys(range(4), 1), DiesOnce, (str(tmp_path / "died"),), address="auto",
                        actors=1))
    assert (tmp_path / "died").exists()
    assert {unit: table["x"].to_pylist() for unit, table in done.items()} == {i: [i] for i in range(4)}


def test_an_error_inside_an_actor_reaches_the_user_as_one_line(tmp_path, local_ray):
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\n")
    cfg = GenerateTextConfig(run_dir=tmp_path / "run", labels=str(labels), model=str(tmp_path / "absent.gguf"),
                             engine="ray")
    with pytest.raises(OvmlError) as error:
        generate_text(cfg)
    assert str(error.value) == (f"GGUF model {tmp_path / 'absent.gguf'} does not exist; "
                                "pass --model PATH to a .gguf file")


def test_engine_ray_without_ray_installed_is_a_one_line_error(tmp_path, tiny_clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OvmlError, match=r"pip install 'ovml\[ray\]'"):
        embed_images(images_config(tmp_path / "run", tiny_clip, helpers.folder_release(tmp_path / "data"),
                                   engine="ray"))


def test_a_pool_without_actors_is_refused_before_the_run_directory_is_touched(tmp_path, tiny_clip):
    with pytest.raises(OvmlError, match="--ray-actors must be at least 1"):
        embed_images(images_config(tmp_path / "run", tiny_clip, helpers.folder_release(tmp_path / "data"),
                                   engine="ray", ray_actors=0))
    assert not (tmp_path / "run").exists()


def generate_config(tmp_path: Path, run: str, **overrides) -> GenerateTextConfig:
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\ncar\ntree\n")
    return GenerateTextConfig(run_dir=tmp_path / run, labels=str(labels), per_label=2, max_labels=2,
                              max_tokens=40, part_size=3, **overrides)


def caption_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "captions").glob("part-*.parquet"))}


@pytest.mark.slow
def test_generate_text_on_ray_writes_the_local_captions_with_the_same_seed(tmp_path, local_ray):
    local = generate_text(generate_config(tmp_path, "local"))
    on_ray = generate_text(generate_config(tmp_path, "ray", engine="ray"))
    assert local.summary["parts"] > 1
    assert caption_bytes(tmp_path / "ray") == caption_bytes(tmp_path / "local")
    assert on_ray.summary == local.summary


@pytest.mark.slow
def test_generate_text_on_ray_resumes_generating_only_the_missing_parts(tmp_path, local_ray):
    generate_text(generate_config(tmp_path, "straight"))
    expected = caption_bytes(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    mark_interrupted(tmp_path / "resumed", "generate_text")
    kept = sorted((tmp_path / "resumed" / "captions").glob("part-*.parquet"))[0]
    kept_mtime = kept.stat().st_mtime_ns
    for lost in sorted((tmp_path / "resumed" / "captions").glob("part-*.parquet"))[1:]:
        lost.unlink()
    generate_text(generate_config(tmp_path, "resumed", engine="ray"))
    assert kept.stat().st_mtime_ns == kept_mtime
    assert caption_bytes(tmp_path / "resumed") == expected
