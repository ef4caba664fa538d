"""`ovml search`: a text query against a cached dataset, zero-shot or through the adapter, via FAISS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build_adapter, build_cache
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline.adapter import load_adapter
from ovml.pipeline.clip import load_clip
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.stages.search import SearchConfig, search

LABELS = ["cat", "dog", "bird", "car"]


@pytest.fixture
def run_dir(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    positives = np.random.default_rng(1).random((60, len(LABELS))) < 0.3
    build_cache(run_dir, tiny_clip, "folder", LABELS, {"all": LABELS}, positives)
    build_adapter(run_dir, tiny_clip)
    return run_dir


def run_search(run_dir, clip, query="cat", **kwargs):
    return search(SearchConfig(run_dir=run_dir, clip=clip, device="cpu", dataset="folder", query=query, **kwargs))


def image_vectors(run_dir):
    from ovml.pipeline.image_cache import read_index

    return read_index(run_dir / "images/folder/index.faiss")


def test_zero_shot_ranks_images_by_cosine_with_the_querys_prompt_pool_embedding(run_dir, tiny_clip):
    found = run_search(run_dir, tiny_clip, zero_shot=True, top=5)
    cosines = image_vectors(run_dir) @ label_embeddings(load_clip(tiny_clip), ["cat"])[0]
    best = np.argsort(-cosines, kind="stable")[:5]
    assert [r["image_id"] for r in found["results"]] == [f"img{i:03d}" for i in best]
    np.testing.assert_allclose([r["score"] for r in found["results"]], cosines[best], atol=1e-5)
    assert found["method"] == "zero-shot" and [r["rank"] for r in found["results"]] == [1, 2, 3, 4, 5]


def test_the_adapter_ranks_images_by_its_own_probability_for_the_query(run_dir, tiny_clip):
    found = run_search(run_dir, tiny_clip, top=5)
    encoder = load_clip(tiny_clip)
    adapter, _ = load_adapter(run_dir / "adapter", tiny_clip, encoder.dim)
    logits = adapter.score(torch.from_numpy(image_vectors(run_dir)),
                           torch.from_numpy(label_embeddings(encoder, ["cat"])))[:, 0]
    best = np.argsort(-logits, kind="stable")[:5]
    assert [r["image_id"] for r in found["results"]] == [f"img{i:03d}" for i in best]
    np.testing.assert_allclose([r["score"] for r in found["results"]], 1 / (1 + np.exp(-logits[best])), atol=1e-5)
    assert found["results"][0]["path"] == f"/data/img{best[0]:03d}.jpg"


def test_adapted_vectors_are_indexed_once_and_again_when_the_adapter_changes(run_dir, tiny_clip):
    run_search(run_dir, tiny_clip)
    [first] = (run_dir / "cache/search/folder").glob("adapter-flat-*.faiss")
    stamp = first.stat().st_mtime_ns
    run_search(run_dir, tiny_clip, query="dog")
    assert first.stat().st_mtime_ns == stamp
    build_adapter(run_dir, tiny_clip, seed=1)
    run_search(run_dir, tiny_clip)
    [second] = (run_dir / "cache/search/folder").glob("adapter-flat-*.faiss")
    assert second != first


def test_ivf_searching_every_cell_finds_what_the_flat_index_finds(run_dir, tiny_clip):
    flat = run_search(run_dir, tiny_clip, top=10)
    ivf = run_search(run_dir, tiny_clip, top=10, index="ivf", nprobe=1000)
    assert [r["image_id"] for r in ivf["results"]] == [r["image_id"] for r in flat["results"]]
    assert ivf["index"] == "ivf"


def test_the_search_leaves_the_image_cache_alone(run_dir, tiny_clip):
    before = {p.name: p.read_bytes() for p in (run_dir / "images/folder").iterdir()}
    run_search(run_dir, tiny_clip, index="ivf")
    assert {p.name: p.read_bytes() for p in (run_dir / "images/folder").iterdir()} == before


def test_cli_json_prints_one_line_with_the_top_images(run_dir, tiny_clip):
    result = CliRunner().invoke(app, ["search", "a cat", "--run-dir", str(run_dir), "--clip", tiny_clip,
                                      "--dataset", "folder", "--top", "3", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["query"] == "a cat" and len(found["results"]) == 3


@pytest.mark.parametrize("kwargs, message", [({"query": "  "}, "the query is empty"), ({"top": 0}, "--top"),
                                             ({"dataset": "voc2007"}, "run `ovml embed-images --dataset voc2007")])
def test_a_bad_request_is_a_one_line_error(run_dir, tiny_clip, kwargs, message):
    config = {"query": "cat", "dataset": "folder"} | kwargs
    with pytest.raises(OvmlError, match=message) as error:
        search(SearchConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", **config))
    assert "\n" not in str(error.value)
