"""`ovml eval`: adapter vs zero-shot CLIP on an image cache, per published protocol, into eval/<dataset>/."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_adapter, build_cache

from ovml.pipeline.adapter import load_adapter
from ovml.pipeline.clip import load_clip
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import ITEMS_SCHEMA, read_image_cache
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.metrics import average_precision, evaluate_scores
from ovml.stages import evaluate as evaluate_module
from ovml.stages.evaluate import EvalConfig, evaluate, ground_truth

NUSWIDE_LABELS = ["sky", "dog", "beach", "car", "tree", "boat", "snow", "person"]
UNSEEN = ["beach", "snow", "boat"]


def nuswide_positives(n=40, seed=0):
    positives = np.random.default_rng(seed).random((n, len(NUSWIDE_LABELS))) < 0.3
    positives[0] = False  # an image with no label at all
    positives[1] = [label not in UNSEEN for label in NUSWIDE_LABELS]  # seen labels only
    return positives


@pytest.fixture
def nuswide_run(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    positives = nuswide_positives()
    build_cache(run_dir, tiny_clip, "nuswide", NUSWIDE_LABELS,
                {"seen": [x for x in NUSWIDE_LABELS if x not in UNSEEN], "unseen": UNSEEN, "all": NUSWIDE_LABELS},
                positives)
    build_adapter(run_dir, tiny_clip)
    return run_dir, positives


def run_eval(run_dir, clip, dataset="nuswide", **kwargs):
    return evaluate(EvalConfig(run_dir=run_dir, clip=clip, device="cpu", dataset=dataset, **kwargs))


def test_report_json_has_the_documented_schema(nuswide_run, tiny_clip):
    run_dir, positives = nuswide_run
    run_eval(run_dir, tiny_clip)
    report = json.loads((run_dir / "eval/nuswide/report.json").read_text())
    assert report["dataset"] == "nuswide" and report["clip"] == tiny_clip
    assert report["random_weights"] is True
    assert report["images"] == len(positives) and report["failures"] == 1
    assert set(report["protocols"]) == {"ZSL", "GZSL"}
    for protocol in report["protocols"].values():
        assert set(protocol["metrics"]) == {"adapter", "zero-shot"}
        for metrics in protocol["metrics"].values():
            assert set(metrics) == {"mAP", "F1@3", "P@3", "R@3", "F1@5", "P@5", "R@5"}
            assert all(0 <= v <= 1 for v in metrics.values())


def test_nuswide_zsl_ranks_the_unseen_labels_and_gzsl_all(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    protocols = json.loads((run_dir / "eval/nuswide/report.json").read_text())["protocols"]
    assert protocols["ZSL"]["labels"] == UNSEEN
    assert protocols["GZSL"]["labels"] == NUSWIDE_LABELS


def test_zero_shot_protocols_count_only_images_with_a_positive(nuswide_run, tiny_clip):
    run_dir, positives = nuswide_run
    run_eval(run_dir, tiny_clip)
    protocols = json.loads((run_dir / "eval/nuswide/report.json").read_text())["protocols"]
    unseen_columns = [NUSWIDE_LABELS.index(x) for x in UNSEEN]
    assert protocols["ZSL"]["images"] == int(positives[:, unseen_columns].any(axis=1).sum())
    assert protocols["GZSL"]["images"] == int(positives.any(axis=1).sum())


def test_report_md_starts_by_saying_the_clip_weights_were_random(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    markdown = (run_dir / "eval/nuswide/report.md").read_text()
    assert "CLIP weights were random" in markdown.splitlines()[0]
    assert tiny_clip in markdown and "| adapter |" in markdown and "| zero-shot |" in markdown


def test_save_scores_all_keeps_a_row_per_image_and_method_in_the_largest_protocol_order(nuswide_run, tiny_clip):
    run_dir, positives = nuswide_run
    run_eval(run_dir, tiny_clip, save_scores="all")
    scores = pq.read_table(run_dir / "eval/nuswide/scores.parquet")
    assert scores.schema.field("scores").type == pa.list_(pa.float32())
    assert scores.num_rows == 2 * len(positives)
    assert sorted(set(scores["method"].to_pylist())) == ["adapter", "zero-shot"]
    assert {len(s) for s in scores["scores"].to_pylist()} == {len(NUSWIDE_LABELS)}


def test_zero_shot_scores_are_cosines_of_image_and_prompt_pool_label_embeddings(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    labels = ["cat", "dog", "bird"]
    vectors = build_cache(run_dir, tiny_clip, "folder", labels, {"all": labels}, np.eye(3, dtype=bool)[[0, 1, 2, 0]])
    build_adapter(run_dir, tiny_clip)
    run_eval(run_dir, tiny_clip, dataset="folder", save_scores="all")
    scores = pq.read_table(run_dir / "eval/folder/scores.parquet").to_pylist()
    zero_shot = np.array([row["scores"] for row in scores if row["method"] == "zero-shot"])
    expected = vectors @ label_embeddings(load_clip(tiny_clip), labels).T
    np.testing.assert_allclose(zero_shot, expected, rtol=1e-5, atol=1e-6)


def test_an_adapter_trained_on_single_template_labels_is_scored_against_single_template_labels(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    labels = ["cat", "dog", "bird"]
    vectors = build_cache(run_dir, tiny_clip, "folder", labels, {"all": labels}, np.eye(3, dtype=bool)[[0, 1, 2, 0]])
    build_adapter(run_dir, tiny_clip, label_templates="single")
    run_eval(run_dir, tiny_clip, dataset="folder", save_scores="all")
    scores = pq.read_table(run_dir / "eval/folder/scores.parquet").to_pylist()
    adapter_scores = np.array([row["scores"] for row in scores if row["method"] == "adapter"])
    adapter, _ = load_adapter(run_dir / "adapter", tiny_clip, load_clip(tiny_clip).dim)
    single = label_embeddings(load_clip(tiny_clip), labels, "single")
    expected = adapter.score(torch.from_numpy(vectors), torch.from_numpy(single))
    np.testing.assert_allclose(adapter_scores, expected, rtol=1e-5, atol=1e-6)


def test_unseen_protocol_ranks_exactly_the_labels_outside_the_adapter_vocabulary(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    labels = ["sky", "dog", "beach", "car", "Tree"]
    build_cache(run_dir, tiny_clip, "folder", labels, {"all": labels}, nuswide_positives()[:, :5])
    build_adapter(run_dir, tiny_clip, vocabulary=("sky", "tree", "Dog"))  # labels match whatever their case
    run_eval(run_dir, tiny_clip, dataset="folder")
    protocols = json.loads((run_dir / "eval/folder/report.json").read_text())["protocols"]
    assert list(protocols) == ["all", "unseen"]
    assert protocols["unseen"]["labels"] == ["beach", "car"]
    assert protocols["unseen"]["ks"] == [1]  # F1@3 over two labels would predict both for every image
    assert protocols["unseen"]["images_with_a_positive_only"] is True


def test_no_unseen_protocol_when_the_adapter_was_trained_on_every_label(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    labels = ["sky", "dog"]
    build_cache(run_dir, tiny_clip, "folder", labels, {"all": labels}, nuswide_positives()[:, :2])
    build_adapter(run_dir, tiny_clip, vocabulary=("sky", "dog", "cat"))
    run_eval(run_dir, tiny_clip, dataset="folder")
    assert list(json.loads((run_dir / "eval/folder/report.json").read_text())["protocols"]) == ["all"]


def test_scores_parquet_keeps_each_images_best_labels_best_first_by_default(nuswide_run, tiny_clip, monkeypatch):
    run_dir, positives = nuswide_run
    run_eval(run_dir, tiny_clip, save_scores="all")
    every = pq.read_table(run_dir / "eval/nuswide/scores.parquet").to_pylist()
    monkeypatch.setattr(evaluate_module, "TOP_SCORES", 3)
    run_eval(run_dir, tiny_clip, force=True)
    top = pq.read_table(run_dir / "eval/nuswide/scores.parquet").to_pylist()
    assert [(r["image_id"], r["method"]) for r in top] == [(r["image_id"], r["method"]) for r in every]
    for row, full in zip(top, every, strict=True):
        best = np.argsort(-np.array(full["scores"]), kind="stable")[:3]
        assert row["labels"] == [NUSWIDE_LABELS[i] for i in best]
        np.testing.assert_array_equal(row["scores"], np.array(full["scores"], np.float32)[best])


def test_streamed_metrics_equal_the_whole_matrix_metrics(nuswide_run, tiny_clip, monkeypatch):
    run_dir, positives = nuswide_run
    monkeypatch.setattr(evaluate_module, "IMAGES_PER_CHUNK", 7)
    monkeypatch.setattr(evaluate_module, "LABELS_PER_BLOCK", 3)
    run_eval(run_dir, tiny_clip)
    report = json.loads((run_dir / "eval/nuswide/report.json").read_text())
    encoder = load_clip(tiny_clip)
    vectors = read_image_cache(run_dir / "images/nuswide")[0]
    adapter, _ = load_adapter(run_dir / "adapter", tiny_clip, encoder.dim)
    label_emb = torch.from_numpy(label_embeddings(encoder, NUSWIDE_LABELS))
    whole = {"adapter": adapter.score(torch.from_numpy(vectors), label_emb), "zero-shot": vectors @ label_emb.numpy().T}
    for name, labels in (("GZSL", NUSWIDE_LABELS), ("ZSL", UNSEEN)):
        cols = [NUSWIDE_LABELS.index(label) for label in labels]
        rows = positives[:, cols].any(axis=1)
        for method, scores in whole.items():
            expected, _ = evaluate_scores(scores[rows][:, cols], positives[rows][:, cols], None, (3, 5))
            assert report["protocols"][name]["metrics"][method] == {k: round(v, 6) for k, v in expected.items()}


def test_an_unknown_save_scores_is_a_one_line_error(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    with pytest.raises(OvmlError, match="--save-scores must be top") as error:
        run_eval(run_dir, tiny_clip, save_scores="some")
    assert "\n" not in str(error.value)


def test_eval_leaves_embed_texts_labels_folder_alone(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    assert not (run_dir / "labels").exists()
    assert list((run_dir / "cache/labels").glob("*.parquet"))


def test_per_label_ap_matches_the_metrics_on_the_scores(nuswide_run, tiny_clip):
    run_dir, positives = nuswide_run
    run_eval(run_dir, tiny_clip, save_scores="all")
    per_label = pq.read_table(run_dir / "eval/nuswide/per_label.parquet").to_pylist()
    scores = pq.read_table(run_dir / "eval/nuswide/scores.parquet").to_pylist()
    adapter = np.array([row["scores"] for row in scores if row["method"] == "adapter"])
    rows = positives.any(axis=1)
    expected = average_precision(adapter[rows], positives[rows])
    gzsl = [row["ap_adapter"] for row in per_label if row["protocol"] == "GZSL"]
    np.testing.assert_allclose(gzsl, expected, rtol=1e-5)
    assert {row["protocol"] for row in per_label} == {"ZSL", "GZSL"}


def test_an_untrained_adapter_scores_exactly_like_zero_shot(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    build_cache(run_dir, tiny_clip, "coco2014", NUSWIDE_LABELS, {"all": NUSWIDE_LABELS}, nuswide_positives())
    build_adapter(run_dir, tiny_clip, trained=False)
    run_eval(run_dir, tiny_clip, dataset="coco2014")
    metrics = json.loads((run_dir / "eval/coco2014/report.json").read_text())["protocols"]["all"]["metrics"]
    assert metrics["adapter"] == metrics["zero-shot"]
    assert set(metrics["adapter"]) == {"mAP", "F1@3", "P@3", "R@3"}


def test_plots_are_png_files(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    plots = sorted(p.name for p in (run_dir / "eval/nuswide").glob("*.png"))
    assert plots == ["ap_GZSL.png", "ap_ZSL.png", "pr_GZSL.png", "pr_ZSL.png"]
    assert all((run_dir / "eval/nuswide" / p).read_bytes().startswith(b"\x89PNG") for p in plots)


def test_summary_carries_the_key_metrics_of_both_methods(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    summary = run_eval(run_dir, tiny_clip).summary
    for key in ("ZSL mAP", "ZSL F1@3", "ZSL F1@5", "GZSL mAP", "GZSL F1@3", "GZSL F1@5"):
        assert set(summary[key]) == {"adapter", "zero-shot"}


def test_eval_is_skipped_when_nothing_changed_and_reruns_when_the_adapter_changes(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    assert run_eval(run_dir, tiny_clip).status == "ran"
    assert run_eval(run_dir, tiny_clip).status == "skipped"
    build_adapter(run_dir, tiny_clip, seed=1)
    assert run_eval(run_dir, tiny_clip).status == "ran"


def test_eval_twice_writes_identical_reports(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    first = {p.name: p.read_bytes() for p in (run_dir / "eval/nuswide").iterdir()}
    run_eval(run_dir, tiny_clip, force=True)
    assert {p.name: p.read_bytes() for p in (run_dir / "eval/nuswide").iterdir()} == first


def test_open_images_unknown_labels_are_ignored():
    items = pa.Table.from_pylist([
        {"row": 0, "image_id": "a", "path": "a.jpg", "positives": ["cat"], "negatives": ["dog"], "ignored": []},
        {"row": 1, "image_id": "b", "path": "b.jpg", "positives": ["dog"], "negatives": None, "ignored": ["bird"]},
    ], schema=ITEMS_SCHEMA)
    positives, ignored = ground_truth(items, ["cat", "dog", "bird"]).dense(np.arange(2), np.arange(3))
    assert positives.tolist() == [[True, False, False], [False, True, False]]
    assert ignored.tolist() == [[False, False, True], [False, False, True]]


def test_a_cache_without_images_is_a_one_line_error_that_keeps_the_earlier_report(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    report = (run_dir / "eval/nuswide/report.json").read_bytes()
    info = json.loads((run_dir / "images/nuswide/dataset.json").read_text())
    (run_dir / "images/nuswide/dataset.json").write_text(json.dumps({**info, "images": 0, "failures": 40}))
    (run_dir / "manifest.json").unlink()  # which vouched for the cache as embed-images wrote it
    with pytest.raises(OvmlError, match="holds no image") as error:
        run_eval(run_dir, tiny_clip)
    assert "\n" not in str(error.value)
    assert (run_dir / "eval/nuswide/report.json").read_bytes() == report


def test_missing_image_cache_says_to_run_embed_images(tmp_path, tiny_clip):
    with pytest.raises(OvmlError, match="run `ovml embed-images --dataset voc2007"):
        run_eval(tmp_path / "run", tiny_clip, dataset="voc2007")


def test_missing_adapter_says_to_run_train_adapter(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    build_cache(run_dir, tiny_clip, "folder", ["cat", "dog"], {"all": ["cat", "dog"]}, np.eye(2, dtype=bool))
    with pytest.raises(OvmlError, match="ovml train-adapter"):
        run_eval(run_dir, tiny_clip, dataset="folder")


def test_unknown_dataset_is_named(tmp_path, tiny_clip):
    with pytest.raises(OvmlError, match="unknown dataset 'imagenet'"):
        run_eval(tmp_path / "run", tiny_clip, dataset="imagenet")


def test_cache_embedded_with_another_clip_is_refused(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    with pytest.raises(OvmlError, match=f"made with CLIP '{tiny_clip}', not 'ovml-tiny:random'"):
        run_eval(run_dir, "ovml-tiny:random")


def test_eval_after_embed_images_counts_the_unreadable_image(tmp_path, tiny_clip):
    from PIL import Image

    from ovml.stages.embed_images import EmbedImagesConfig, embed_images

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    rows = ["path,labels"]
    for i, labels in enumerate(["cat|sofa", "dog", "cat", "dog|sofa", "sofa"]):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
        rows.append(f"{i}.jpg,{labels}")
    (photos / "broken.jpg").write_bytes(b"not an image")
    rows.append("broken.jpg,cat")
    (photos / "labels.csv").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    embed_images(EmbedImagesConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder",
                                   root=str(photos / "labels.csv"), workers=0))
    build_adapter(run_dir, tiny_clip)
    summary = run_eval(run_dir, tiny_clip, dataset="folder").summary
    report = json.loads((run_dir / "eval/folder/report.json").read_text())
    assert (report["images"], report["failures"]) == (5, 1)
    assert report["protocols"]["all"]["labels"] == ["cat", "dog", "sofa"]
    assert set(summary["all mAP"]) == {"adapter", "zero-shot"}


@pytest.fixture
def local_run(tmp_path, tiny_clip):
    """A folder cache embedded with --local (patch features) and an adapter."""
    import helpers

    from ovml.stages.embed_images import EmbedImagesConfig, embed_images

    run_dir = tmp_path / "run"
    embed_images(EmbedImagesConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder", workers=0,
                                   root=str(helpers.folder_release(tmp_path / "data")), local=True))
    build_adapter(run_dir, tiny_clip)
    return run_dir


def test_a_cache_with_patch_features_adds_the_local_rows_to_the_report(local_run, tiny_clip):
    run_eval(local_run, tiny_clip, dataset="folder")
    report = json.loads((local_run / "eval/folder/report.json").read_text())
    assert set(report["protocols"]["all"]["metrics"]) == {"adapter", "zero-shot", "adapter+local",
                                                          "zero-shot+local"}
    assert report["local"] == {"weight": 0.25, "top_k": 4, "patches": 16, "pooling": "top-k", "local_head": False}
    assert "| zero-shot+local |" in (local_run / "eval/folder/report.md").read_text()


def test_local_weight_zero_gives_the_global_scores(local_run, tiny_clip):
    run_eval(local_run, tiny_clip, dataset="folder", save_scores="all", local_weight=0.0)
    scores = {row["method"]: row["scores"] for row in
              pq.read_table(local_run / "eval/folder/scores.parquet").to_pylist() if row["image_id"] == "imgs/a.jpg"}
    assert scores["adapter+local"] == pytest.approx(scores["adapter"], abs=1e-6)
    assert scores["zero-shot+local"] == pytest.approx(scores["zero-shot"], abs=1e-6)


def test_zero_shot_local_at_full_weight_is_the_best_patch_cosine(local_run, tiny_clip):
    from ovml.pipeline.image_cache import read_patches

    run_eval(local_run, tiny_clip, dataset="folder", save_scores="all", local_weight=1.0, local_top_k=1)
    patches = read_patches(local_run / "images/folder").astype(np.float32)
    labels = json.loads((local_run / "eval/folder/report.json").read_text())["protocols"]["all"]["labels"]
    label_emb = label_embeddings(load_clip(tiny_clip, "cpu"), labels, "pool")
    rows = [row for row in pq.read_table(local_run / "eval/folder/scores.parquet").to_pylist()
            if row["method"] == "zero-shot+local"]
    for i, row in enumerate(rows):
        assert row["scores"] == pytest.approx((patches[i] @ label_emb.T).max(axis=0), abs=1e-5)


def test_local_weight_outside_zero_to_one_is_a_one_line_error(local_run, tiny_clip):
    with pytest.raises(OvmlError, match="--local-weight"):
        run_eval(local_run, tiny_clip, dataset="folder", local_weight=1.5)


def test_an_adapter_with_a_local_head_scores_patches_with_it_at_full_weight(local_run, tiny_clip):
    from ovml.pipeline.image_cache import read_patches

    model = build_adapter(local_run, tiny_clip, local_pooling="softmax")
    run_eval(local_run, tiny_clip, dataset="folder", save_scores="all", local_weight=1.0)
    report = json.loads((local_run / "eval/folder/report.json").read_text())
    assert report["local"] | {"weight": 1.0} == {"weight": 1.0, "top_k": 4, "patches": 16, "pooling": "softmax",
                                                  "local_head": True}
    patches = torch.from_numpy(read_patches(local_run / "images/folder").astype(np.float32))
    label_emb = torch.from_numpy(label_embeddings(load_clip(tiny_clip, "cpu"), report["protocols"]["all"]["labels"],
                                                  "pool"))
    with torch.inference_mode():
        expected = model.local_logits(model.local_features(patches), label_emb).numpy()
    rows = [row for row in pq.read_table(local_run / "eval/folder/scores.parquet").to_pylist()
            if row["method"] == "adapter+local"]
    for i, row in enumerate(rows):
        assert row["scores"] == pytest.approx(expected[i], abs=1e-4)


def test_zero_shot_local_pools_patches_as_the_adapters_local_head_does(local_run, tiny_clip):
    """The zero-shot+local row isolates the pooling: patch cosines pooled the same way, no training."""
    from ovml.pipeline.adapter import pool_tokens
    from ovml.pipeline.image_cache import read_patches

    model = build_adapter(local_run, tiny_clip, local_pooling="softmax")
    run_eval(local_run, tiny_clip, dataset="folder", save_scores="all", local_weight=1.0)
    labels = json.loads((local_run / "eval/folder/report.json").read_text())["protocols"]["all"]["labels"]
    patches = torch.from_numpy(read_patches(local_run / "images/folder").astype(np.float32))
    label_emb = torch.from_numpy(label_embeddings(load_clip(tiny_clip, "cpu"), labels, "pool"))
    scale = model.config.scale
    expected = (pool_tokens(scale * patches @ label_emb.T, None, "softmax", 2) / scale).numpy()
    rows = [row for row in pq.read_table(local_run / "eval/folder/scores.parquet").to_pylist()
            if row["method"] == "zero-shot+local"]
    for i, row in enumerate(rows):
        assert row["scores"] == pytest.approx(expected[i], abs=1e-5)


def test_eval_reads_a_pq_patch_cache_as_it_reads_float16_patches(tmp_path, tiny_clip):
    import helpers

    from ovml.stages.embed_images import EmbedImagesConfig, embed_images

    csv_file = helpers.noise_folder(tmp_path / "data")
    maps = {}
    for store in ("float16", "pq"):
        run_dir = tmp_path / store
        embed_images(EmbedImagesConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder", workers=0,
                                       root=str(csv_file), local=True, local_store=store))
        build_adapter(run_dir, tiny_clip, vocabulary=("cat",))
        run_eval(run_dir, tiny_clip, dataset="folder", save_scores="all", local_weight=1.0)
        maps[store] = {row["image_id"]: row["scores"] for row in
                       pq.read_table(run_dir / "eval/folder/scores.parquet").to_pylist()
                       if row["method"] == "zero-shot+local"}
    for image_id, scores in maps["float16"].items():
        assert maps["pq"][image_id] == pytest.approx(scores, abs=0.05)


def ceiling_run(tmp_path, tiny_clip):
    """The nuswide run plus a labelled training cache of other images (as embed-images --split train makes); the
    images lean towards directions of their own, so zero-shot is poor and the probe has something to learn."""
    run_dir = tmp_path / "run"
    splits = {"seen": [x for x in NUSWIDE_LABELS if x not in UNSEEN], "unseen": UNSEEN, "all": NUSWIDE_LABELS}
    directions = np.random.default_rng(7).standard_normal((len(NUSWIDE_LABELS), load_clip(tiny_clip).dim)) / 4
    build_cache(run_dir, tiny_clip, "nuswide", NUSWIDE_LABELS, splits, nuswide_positives(), directions=directions)
    build_cache(run_dir, tiny_clip, "nuswide-train", NUSWIDE_LABELS, splits, nuswide_positives(n=600, seed=1), seed=1,
                directions=directions)
    build_adapter(run_dir, tiny_clip)
    return run_dir


def test_ceiling_adds_a_probe_row_trained_on_the_other_caches_labels_to_every_protocol(tmp_path, tiny_clip):
    run_dir = ceiling_run(tmp_path, tiny_clip)
    summary = run_eval(run_dir, tiny_clip, ceiling="nuswide-train").summary
    report = json.loads((run_dir / "eval/nuswide/report.json").read_text())
    assert all(set(p["metrics"]) == {"adapter", "zero-shot", "ceiling"} for p in report["protocols"].values())
    assert report["ceiling"]["cache"] == "nuswide-train" and report["ceiling"]["images"] == 600
    vectors, _, _ = read_image_cache(run_dir / "images/nuswide")
    train, items, _ = read_image_cache(run_dir / "images/nuswide-train")
    positives = np.array([[label in row for label in NUSWIDE_LABELS] for row in items["positives"].to_pylist()])
    from ovml.pipeline.probe import fit_ceiling

    scores = fit_ceiling(train, positives).scores(vectors)
    truth = nuswide_positives()
    rows = truth[:, [NUSWIDE_LABELS.index(x) for x in UNSEEN]].any(axis=1)
    expected, _ = evaluate_scores(scores[rows][:, [NUSWIDE_LABELS.index(x) for x in UNSEEN]],
                                  truth[rows][:, [NUSWIDE_LABELS.index(x) for x in UNSEEN]], None, (3, 5))
    assert summary["ZSL mAP"]["ceiling"] == pytest.approx(expected["mAP"], abs=1e-6)


def test_the_report_shows_the_headroom_the_adapter_recovers(tmp_path, tiny_clip):
    run_dir = ceiling_run(tmp_path, tiny_clip)
    run_eval(run_dir, tiny_clip, ceiling="nuswide-train")
    report = json.loads((run_dir / "eval/nuswide/report.json").read_text())
    gzsl = {m: v["mAP"] for m, v in report["protocols"]["GZSL"]["metrics"].items()}
    assert gzsl["ceiling"] > gzsl["zero-shot"]
    share = (gzsl["adapter"] - gzsl["zero-shot"]) / (gzsl["ceiling"] - gzsl["zero-shot"])
    text = (run_dir / "eval/nuswide/report.md").read_text()
    assert f"(adapter - zero-shot) / (ceiling - zero-shot) in mAP: {100 * share:.1f} %" in text
    assert "labels the adapter never sees" in text


@pytest.mark.parametrize("ceiling", ["nuswide", "missing-cache"])
def test_a_ceiling_that_is_the_evaluated_cache_or_absent_is_a_one_line_error(tmp_path, tiny_clip, ceiling):
    run_dir = ceiling_run(tmp_path, tiny_clip)
    with pytest.raises(OvmlError, match=f"--ceiling {ceiling}: .* holds no other image cache; embed labelled"):
        run_eval(run_dir, tiny_clip, ceiling=ceiling)
    assert not (run_dir / "eval").exists()


def test_eval_without_ceiling_keeps_its_fingerprint(nuswide_run, tiny_clip):
    run_dir, _ = nuswide_run
    run_eval(run_dir, tiny_clip)
    assert "ceiling" not in json.loads((run_dir / "manifest.json").read_text())["stages"]["eval/nuswide"]["params"]
