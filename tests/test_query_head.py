"""The query head (train-adapter --head query): learnable queries over tokens, scored by any label list."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_adapter, folder_release, unit
from PIL import Image
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline import atomic
from ovml.pipeline.adapter import Adapter, AdapterConfig, load_adapter
from ovml.pipeline.clip import load_clip
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import FAILURES_SCHEMA, ITEMS_SCHEMA, read_image_cache, read_patches, write_image_cache
from ovml.pipeline.image_cache import write_patches as write_patch_file
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.text_embeddings import embedding_array, write_text_embeddings
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.evaluate import EvalConfig, evaluate
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

CLIP = "sim:unit-test"
DIM = 16
LABELS = [f"label{i}" for i in range(6)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def token_run(root: Path, n: int = 300, tokens: bool = True) -> np.ndarray:
    """Captions whose word tokens are one noisy vector per named label plus a filler word (embed-text --local)."""
    rng = np.random.default_rng(0)
    label_emb = unit(rng.normal(size=(len(LABELS), DIM)))
    targets = rng.random((n, len(LABELS))) < 0.3
    ids = [f"c{i:05d}" for i in range(n)]
    atomic.write_parquet(root / "captions/part-00000.parquet", pa.table({
        "caption_id": ids, "labels": [[LABELS[j] for j in np.flatnonzero(row)] for row in targets]}))
    atomic.write_json(root / "captions/vocabulary.json", {"labels": LABELS, "synonyms": {}})
    words = [unit(np.vstack([label_emb[np.flatnonzero(row)], rng.normal(size=(1, DIM))])
                  + 0.3 * rng.normal(size=(row.sum() + 1, DIM))) for row in targets]
    text = unit(targets @ label_emb + 0.5 * rng.normal(size=(n, DIM)))
    write_text_embeddings(root / "text_emb/part-00000.parquet", ids, text, "float32", tokens=words if tokens else None)
    atomic.write_parquet(root / "labels/train.parquet", pa.table({"label": LABELS,
                                                                 "embedding": embedding_array(label_emb)}))
    return label_emb


def patch_cache(run_dir: Path, label_emb: np.ndarray, n: int = 200) -> None:
    """images/train/ with 4 patches per image (embed-images --local): each positive's vector in one patch."""
    rng = np.random.default_rng(1)
    targets = rng.random((n, len(LABELS))) < 0.3
    patches = unit(rng.normal(size=(n, 4, DIM)) * 0.3 + np.stack(
        [np.vstack([label_emb[np.flatnonzero(row)], np.zeros((4 - min(4, row.sum()), DIM))])[:4] for row in targets]))
    directory = run_dir / "images" / "train"
    write_patch_file(directory, [lambda: (np.arange(n), patches.astype(np.float16))], n, "float16")
    items = pa.Table.from_pylist([
        {"row": i, "image_id": f"img{i}", "path": f"/d/{i}.jpg", "positives": [LABELS[j] for j in np.flatnonzero(r)],
         "negatives": None, "ignored": []} for i, r in enumerate(targets)], schema=ITEMS_SCHEMA)
    write_image_cache(directory, unit(targets @ label_emb + 0.5 * rng.normal(size=(n, DIM))), items,
                      FAILURES_SCHEMA.empty_table(), {"dataset": "folder", "root": "/d", "clip": CLIP,
                                                      "random_weights": False, "labels": LABELS,
                                                      "splits": {"all": LABELS}, "images": n, "failures": 0})


def config(run_dir: Path, **overrides) -> TrainAdapterConfig:
    values = {"run_dir": run_dir, "clip": CLIP, "device": "cpu", "hidden": 32, "epochs": 6, "batch_size": 32,
              "patience": 10, "head": "query", "queries": 4}
    return TrainAdapterConfig(**(values | overrides))


def test_the_query_head_scores_any_label_list_each_label_on_its_own():
    torch.manual_seed(0)
    model = Adapter(AdapterConfig(dim=DIM, clip=CLIP, vocabulary=["a"], head="query", queries=3)).eval()
    labels = torch.from_numpy(unit(np.random.default_rng(0).normal(size=(7, DIM))))
    with torch.inference_mode():
        q = model.query_features(torch.from_numpy(unit(np.ones((2, DIM)))), torch.randn(2, 5, DIM))
        all_seven, two = model.query_logits(q, labels), model.query_logits(q, labels[[5, 2]])
    assert all_seven.shape == (2, 7) and torch.allclose(two, all_seven[:, [5, 2]])
    many = Adapter(AdapterConfig(dim=DIM, clip=CLIP, vocabulary=LABELS * 50, head="query", queries=3))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in many.state_dict().items()}


def test_query_head_trains_on_caption_word_tokens(tmp_path):
    token_run(tmp_path)
    outcome = train_adapter(config(tmp_path))
    _, adapter = load_adapter(tmp_path / "adapter", CLIP, DIM)
    assert (adapter.head, adapter.queries) == ("query", 4) and outcome.summary["best_val_mAP"] > 0.7


def test_query_head_trains_on_image_patches_with_captions(tmp_path):
    label_emb = token_run(tmp_path)
    patch_cache(tmp_path, label_emb)
    outcome = train_adapter(config(tmp_path, images="train"))
    assert outcome.summary["images"] == 200 and outcome.summary["best_val_mAP"] > 0.7


def test_query_head_without_caption_tokens_is_a_one_line_error(tmp_path):
    token_run(tmp_path, tokens=False)
    result = CliRunner().invoke(app, ["train-adapter", "--run-dir", str(tmp_path), "--clip", CLIP, "--head", "query"])
    assert result.exit_code == 2 and "embed-text --local" in result.output and "Traceback" not in result.output


def test_query_head_on_images_without_patches_is_a_one_line_error(tmp_path):
    label_emb = token_run(tmp_path)
    patch_cache(tmp_path, label_emb)
    (tmp_path / "images/train/patches.npy").unlink()
    with pytest.raises(OvmlError, match="re-run embed-images with --local"):
        train_adapter(config(tmp_path, images="train"))


def test_distillation_keeps_adapted_image_embeddings_nearer_clips(tmp_path):
    label_emb = token_run(tmp_path / "plain")
    token_run(tmp_path / "distilled")
    for name, distill in (("plain", 0.0), ("distilled", 5.0)):
        patch_cache(tmp_path / name, label_emb)
        train_adapter(config(tmp_path / name, head="cosine", images="train", distill=distill, epochs=10, alpha=2.0))
    vectors = torch.from_numpy(read_image_cache(tmp_path / "plain/images/train")[0])

    def similarity(name: str) -> float:
        model, _ = load_adapter(tmp_path / name / "adapter", CLIP, DIM)
        return float((model.all_features(vectors) * vectors).sum(dim=1).mean())

    assert similarity("distilled") > similarity("plain")


@pytest.fixture
def query_run(tmp_path, tiny_clip):
    """A folder cache embedded with --local (patch features) and a query-head adapter."""
    run_dir = tmp_path / "run"
    embed_images(EmbedImagesConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder", workers=0,
                                   root=str(folder_release(tmp_path / "data")), local=True))
    return run_dir, build_adapter(run_dir, tiny_clip, head="query")


def test_eval_scores_the_adapter_row_with_the_query_head(query_run, tiny_clip):
    run_dir, model = query_run
    evaluate(EvalConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder", save_scores="all"))
    vectors, items, _ = read_image_cache(run_dir / "images/folder")
    patches = torch.from_numpy(read_patches(run_dir / "images/folder").astype(np.float32))
    report = json.loads((run_dir / "eval/folder/report.json").read_text())
    labels = report["protocols"]["all"]["labels"]
    label_emb = torch.from_numpy(label_embeddings(load_clip(tiny_clip), labels, "pool"))
    with torch.inference_mode():
        expected = model.query_logits(model.query_features(torch.from_numpy(vectors), patches), label_emb).numpy()
    rows = [r for r in pq.read_table(run_dir / "eval/folder/scores.parquet").to_pylist() if r["method"] == "adapter"]
    for row in rows:
        i = items["image_id"].to_pylist().index(row["image_id"])
        assert [row["scores"][labels.index(label)] for label in labels] == pytest.approx(list(expected[i]), abs=1e-4)
    assert "adapter+local" not in report["protocols"]["all"]["metrics"]


def test_eval_of_a_query_head_without_patches_is_a_one_line_error(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    embed_images(EmbedImagesConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder", workers=0,
                                   root=str(folder_release(tmp_path / "data"))))
    build_adapter(run_dir, tiny_clip, head="query")
    with pytest.raises(OvmlError, match="query head, which attends over image patches"):
        evaluate(EvalConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="folder"))


def test_predict_scores_with_the_query_head(tmp_path, tiny_clip):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photo)
    model = build_adapter(tmp_path / "run", tiny_clip, head="query")
    result = CliRunner().invoke(app, ["predict", str(photo), "--labels", "cat,dog,sky", "--json", "--run-dir",
                                      str(tmp_path / "run"), "--clip", tiny_clip])
    assert result.exit_code == 0, result.output
    encoder = load_clip(tiny_clip, "cpu")
    vectors, patches = encoder.encode_image_patches(encoder.preprocess(Image.open(photo).convert("RGB"))[None])
    label_emb = torch.from_numpy(label_embeddings(encoder, ["cat", "dog", "sky"], "pool"))
    with torch.inference_mode():
        logits = model.query_logits(model.query_features(torch.from_numpy(vectors), torch.from_numpy(patches)),
                                    label_emb)
    expected = dict(zip(["cat", "dog", "sky"], torch.sigmoid(logits)[0].tolist(), strict=True))
    prediction = json.loads(result.stdout)[0]["labels"]
    assert {item["label"]: item["score"] for item in prediction} == pytest.approx(expected, abs=1e-5)
