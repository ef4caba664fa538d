"""--engine ray: the same artifacts as the local engine, the same resume, on a local Ray with 2 CPUs.

Ray starts once for this module (about 10 s) and is shut down at its end; stages join it instead of
starting their own.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import helpers
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ovml.stages.generate_text as generate_text_stage
from ovml.pipeline.engine import RayEngine
from ovml.pipeline.errors import OvmlError
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


def staged(run_dir: Path, name: str) -> Path:
    """The one file called `name` that a killed attempt left in .staging/ (where outputs are built)."""
    [path] = (run_dir / ".staging").rglob(name)
    return path


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


def test_patch_features_on_ray_are_the_local_engines_byte_for_byte(tmp_path, tiny_clip, local_ray):
    csv_file = helpers.folder_release(tmp_path / "data")
    embed_images(images_config(tmp_path / "local", tiny_clip, csv_file, local=True))
    embed_images(images_config(tmp_path / "ray", tiny_clip, csv_file, local=True, engine="ray"))
    local, on_ray = tree_bytes(tmp_path / "local" / "images"), tree_bytes(tmp_path / "ray" / "images")
    assert any("patches" in name for name in on_ray)
    assert on_ray == local


def test_embed_images_on_ray_resumes_a_killed_local_run_embedding_only_the_missing_chunks(tmp_path, tiny_clip,
                                                                                        local_ray, ctrl_c_raises):
    """A FIFO in place of the 4th image blocks the local run there; SIGINT kills it; Ray finishes the rest."""
    data = tmp_path / "data"
    for i in range(5):
        helpers.write_jpeg(data / f"{i}.jpg", 30 * i)
    (data / "labels.csv").write_text("path,labels\n" + "".join(f"{i}.jpg,l{i}\n" for i in range(5)))
    embed_images(images_config(tmp_path / "straight", tiny_clip, data / "labels.csv", batch_size=1))
    (data / "3.jpg").rename(data / "3.jpg.real")
    os.mkfifo(data / "3.jpg")
    cfg = images_config(tmp_path / "resumed", tiny_clip, data / "labels.csv", batch_size=1)
    staging = tmp_path / "resumed" / ".staging"

    helpers.ctrl_c_once_chunks_are_staged(staging)
    with pytest.raises(KeyboardInterrupt):
        embed_images(cfg)
    (data / "3.jpg").unlink()
    (data / "3.jpg.real").rename(data / "3.jpg")

    outcome = embed_images(EmbedImagesConfig(**{**cfg.__dict__, "engine": "ray"}))
    assert outcome.reason.startswith("resuming an interrupted run") and outcome.summary["reused"] == 3
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


def test_caption_token_features_on_ray_are_the_local_engines_byte_for_byte(tmp_path, tiny_clip, local_ray):
    for run in ("local", "ray"):
        write_captions(tmp_path / run, CAPTIONS)
    embed_text(text_config(tmp_path / "local", tiny_clip, local=True))
    embed_text(text_config(tmp_path / "ray", tiny_clip, local=True, engine="ray"))
    assert "tokens" in pq.read_schema(tmp_path / "ray" / "text_emb" / "part-00000.parquet").names
    assert tree_bytes(tmp_path / "ray" / "text_emb") == tree_bytes(tmp_path / "local" / "text_emb")


def test_embed_text_on_ray_resumes_a_killed_local_run_writing_only_the_missing_parts(tmp_path, tiny_clip,
                                                                                   local_ray, monkeypatch):
    write_captions(tmp_path / "straight", CAPTIONS)
    embed_text(text_config(tmp_path / "straight", tiny_clip))
    write_captions(tmp_path / "killed", CAPTIONS)
    helpers.embed_text_killed_after_its_first_part(text_config(tmp_path / "killed", tiny_clip), monkeypatch)
    kept = staged(tmp_path / "killed", "part-00000.parquet").stat()
    outcome = embed_text(text_config(tmp_path / "killed", tiny_clip, engine="ray"))
    assert outcome.reason.startswith("resuming an interrupted run") and outcome.summary["resumed_parts"] == 1
    committed = (tmp_path / "killed" / "text_emb" / "part-00000.parquet").stat()
    assert (committed.st_ino, committed.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert tree_bytes(tmp_path / "killed" / "text_emb") == tree_bytes(tmp_path / "straight" / "text_emb")


def test_embed_text_on_ray_embeds_only_the_new_parts_of_a_topped_up_pool(tmp_path, tiny_clip, local_ray):
    for run in ("local", "ray"):
        write_captions(tmp_path / run, CAPTIONS)
        embed_text(text_config(tmp_path / run, tiny_clip))
        write_captions(tmp_path / run, {"part-00003.parquet": ["a kite over the beach", "a dog"]})
    earlier = (tmp_path / "ray" / "text_emb" / "part-00001.parquet").stat().st_ino
    embed_text(text_config(tmp_path / "local", tiny_clip))
    outcome = embed_text(text_config(tmp_path / "ray", tiny_clip, engine="ray"))
    assert (outcome.summary["reused_parts"], outcome.summary["texts"]) == (3, 9)
    assert (tmp_path / "ray" / "text_emb" / "part-00001.parquet").stat().st_ino == earlier  # kept, not rewritten
    assert tree_bytes(tmp_path / "ray" / "text_emb") == tree_bytes(tmp_path / "local" / "text_emb")


class DiesOnce:
    """A worker whose process dies in the middle of its first task, as on a lost node."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def __call__(self, batch):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        yield batch


def test_a_lost_actor_is_restarted_and_its_work_redone(tmp_path, local_ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor imports nothing from tests/
    items = [{"unit": i, "x": i} for i in range(4)]
    with RayEngine("auto", actors=1, device="cpu") as engine:
        done = {unit: pa.concat_tables(tables) for unit, tables in engine.map(DiesOnce, (str(tmp_path / "died"),),
                                                                              items)}
    assert (tmp_path / "died").exists()
    assert {unit: table["x"].to_pylist() for unit, table in done.items()} == {i: [i] for i in range(4)}


class MissingModel:
    """A worker that meets a user error on its node, as an actor whose GGUF path is absent there."""

    def __init__(self, path: str):
        raise OvmlError(f"GGUF model {path} does not exist; pass --model PATH to a .gguf file")


def test_an_error_inside_an_actor_reaches_the_user_as_one_line(tmp_path, local_ray):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(OvmlError) as error:
        with RayEngine("auto", actors=1, device="cpu") as engine:
            list(engine.map(MissingModel, ("/nodes/disk/absent.gguf",), [{"unit": 0}]))
    assert str(error.value) == "GGUF model /nodes/disk/absent.gguf does not exist; pass --model PATH to a .gguf file"


def test_generate_text_on_ray_checks_the_model_in_the_driver_before_any_actor_starts(tmp_path, local_ray,
                                                                                     monkeypatch):
    monkeypatch.setattr(RayEngine, "map", None)  # calling it would fail loudly
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\n")
    cfg = GenerateTextConfig(run_dir=tmp_path / "run", labels=str(labels), model=str(tmp_path / "absent.gguf"),
                             engine="ray")
    with pytest.raises(OvmlError) as error:
        generate_text(cfg)
    assert str(error.value) == (f"GGUF model {tmp_path / 'absent.gguf'} does not exist; "
                                "pass --model PATH to a .gguf file")
    assert not (tmp_path / "run" / "captions").exists()


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
    return GenerateTextConfig(**{"run_dir": tmp_path / run, "labels": str(labels), "per_label": 2, "max_labels": 2,
                                 "max_tokens": 40, "part_size": 3, **overrides})


def caption_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "captions").glob("part-*.parquet"))}


def assert_same_captions(run_dir: Path, expected_dir: Path) -> None:
    """Rows first, so that a difference shows which captions differ, then the bytes of every part."""
    def rows(d: Path) -> dict[str, list[dict]]:
        return {p.name: pq.read_table(p).to_pylist() for p in sorted((d / "captions").glob("part-*.parquet"))}
    assert rows(run_dir) == rows(expected_dir)
    assert caption_bytes(run_dir) == caption_bytes(expected_dir)


@pytest.mark.slow
def test_generate_text_on_ray_writes_the_local_captions_with_the_same_seed(tmp_path, local_ray):
    local = generate_text(generate_config(tmp_path, "local"))
    on_ray = generate_text(generate_config(tmp_path, "ray", engine="ray"))
    assert local.summary["parts"] > 1
    assert_same_captions(tmp_path / "ray", tmp_path / "local")
    assert on_ray.summary == local.summary


@pytest.mark.slow
def test_generate_text_on_ray_resumes_a_killed_local_run_generating_only_the_missing_parts(tmp_path, local_ray,
                                                                                        monkeypatch):
    generate_text(generate_config(tmp_path, "straight"))
    expected = caption_bytes(tmp_path / "straight")
    real_generate_part, calls = generate_text_stage._generate_part, []

    def die_on_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first part landed in staging
        return real_generate_part(*args, **kwargs)

    monkeypatch.setattr(generate_text_stage, "_generate_part", die_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        generate_text(generate_config(tmp_path, "resumed"))
    monkeypatch.setattr(generate_text_stage, "_generate_part", real_generate_part)
    kept = staged(tmp_path / "resumed", "part-00000.parquet").stat()
    outcome = generate_text(generate_config(tmp_path, "resumed", engine="ray"))
    assert outcome.reason.startswith("resuming an interrupted run")
    committed = (tmp_path / "resumed" / "captions" / "part-00000.parquet").stat()
    assert (committed.st_ino, committed.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert caption_bytes(tmp_path / "resumed") == expected


@pytest.mark.slow
def test_generate_text_on_ray_tops_up_the_pool_as_the_local_engine_does(tmp_path, local_ray):
    generate_text(generate_config(tmp_path, "local", per_label=1))
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    kept = {p.name: p.stat().st_ino for p in (tmp_path / "ray" / "captions").glob("part-*.parquet")}
    local = generate_text(generate_config(tmp_path, "local", per_label=3))
    on_ray = generate_text(generate_config(tmp_path, "ray", per_label=3, engine="ray"))
    assert on_ray.summary["pool"]["kept"] > 0 and on_ray.summary["pool"]["added"] > 0
    assert {name: (tmp_path / "ray" / "captions" / name).stat().st_ino for name in kept} == kept
    assert_same_captions(tmp_path / "ray", tmp_path / "local")
    assert on_ray.summary == local.summary
