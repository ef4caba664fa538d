"""train-adapter end to end on run directories built here: artifacts, determinism, skipping, and the
modality-gap simulation of why the training noise exists."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import unit
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline.adapter import load_adapter
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.metrics import average_precision, mean_average_precision
from ovml.pipeline.text_embeddings import embedding_array, write_text_embeddings
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

CLIP = "sim:unit-test"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def write_run(root: Path, label_emb: np.ndarray, text_emb: np.ndarray, targets: np.ndarray,
              tokens: list[np.ndarray] | None = None) -> Path:
    """The artifacts generate-text and embed-text (with --local when tokens are given) would leave: captions,
    vocabulary, text_emb, labels."""
    vocabulary = [f"label{i}" for i in range(len(label_emb))]
    ids = [f"c{i:05d}" for i in range(len(text_emb))]
    (root / "captions").mkdir(parents=True)
    pq.write_table(pa.table({"caption_id": ids,
                             "labels": [[vocabulary[j] for j in np.flatnonzero(row)] for row in targets]}),
                   root / "captions/part-00000.parquet")
    (root / "captions/vocabulary.json").write_text(json.dumps({"labels": vocabulary, "synonyms": {}}))
    write_text_embeddings(root / "text_emb/part-00000.parquet", ids, text_emb, "float32", tokens=tokens)
    (root / "labels").mkdir()
    pq.write_table(pa.table({"label": vocabulary, "embedding": embedding_array(label_emb)}),
                   root / "labels/train.parquet")
    return root


def small_run(root: Path, seed: int = 0, n: int = 300, labels: int = 6, dim: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    label_emb = unit(rng.normal(size=(labels, dim)))
    targets = rng.random((n, labels)) < 0.3
    return write_run(root, label_emb, unit(targets @ label_emb + 0.5 * rng.normal(size=(n, dim))), targets)


def local_run(root: Path, seed: int = 0, n: int = 300, labels: int = 6, dim: int = 16) -> Path:
    """small_run with word tokens: one noisy token per label of the caption, and a filler token, all with their
    dimensions reversed: a gap between word and label features that zero-shot pooling cannot cross, training can."""
    rng = np.random.default_rng(seed)
    label_emb = unit(rng.normal(size=(labels, dim)))
    targets = rng.random((n, labels)) < 0.3
    tokens = [unit(np.vstack([label_emb[np.flatnonzero(row)], rng.normal(size=(1, dim))])[:, ::-1]
                   + 0.3 * rng.normal(size=(row.sum() + 1, dim))) for row in targets]
    text = unit(targets @ label_emb + 0.5 * rng.normal(size=(n, dim)))
    return write_run(root, label_emb, text, targets, tokens)


def config(run_dir: Path, **overrides) -> TrainAdapterConfig:
    values = {"run_dir": run_dir, "clip": CLIP, "device": "cpu", "hidden": 32, "epochs": 3, "batch_size": 64}
    return TrainAdapterConfig(**(values | overrides))


def test_training_writes_weights_config_and_a_log_row_per_epoch(tmp_path):
    outcome = train_adapter(config(small_run(tmp_path), patience=10))
    adapter = tmp_path / "adapter"
    assert outcome.status == "ran"
    cfg = json.loads((adapter / "config.json").read_text())
    assert {"architecture", "dim", "vocabulary", "clip", "label_templates", "training", "ovml_version"} <= set(cfg)
    assert {"noise", "loss", "seed", "best_epoch", "best_val_mAP"} <= set(cfg["training"])
    assert cfg["dim"] == 16 and cfg["clip"] == CLIP and len(cfg["vocabulary"]) == 6
    log = pq.read_table(adapter / "train_log.parquet").to_pylist()
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert {"loss", "val_mAP", "lr", "seconds"} <= set(log[0])
    model, _ = load_adapter(adapter, CLIP, 16)
    assert model(torch.zeros(2, 16) + 0.25, torch.eye(16)[:6]).shape == (2, 6)


def test_the_adapter_records_the_label_templates_embed_text_used(tmp_path):
    run = small_run(tmp_path)
    labels = pq.read_table(run / "labels/train.parquet")
    pq.write_table(labels.replace_schema_metadata({"templates": "single"}), run / "labels/train.parquet")
    train_adapter(config(run))
    assert json.loads((run / "adapter/config.json").read_text())["label_templates"] == "single"


@pytest.mark.parametrize("loss, head", [("asl", "cosine"), ("bce", "magnitude"), ("rank", "cosine")])
def test_every_loss_and_head_learns_beyond_the_first_epoch(tmp_path, loss, head):
    train_adapter(config(small_run(tmp_path), loss=loss, head=head, epochs=4, patience=10, lr=3e-3))
    log = pq.read_table(tmp_path / "adapter/train_log.parquet").to_pylist()
    assert log[-1]["loss"] < log[0]["loss"]


def test_same_inputs_and_seed_give_byte_identical_weights(tmp_path):
    first = small_run(tmp_path / "a", seed=3)
    second = small_run(tmp_path / "b", seed=3)
    train_adapter(config(first, seed=7))
    train_adapter(config(second, seed=7))
    assert (first / "adapter/model.safetensors").read_bytes() == (second / "adapter/model.safetensors").read_bytes()


def test_captions_are_joined_to_their_embeddings_by_id_whatever_the_row_order(tmp_path):
    rng = np.random.default_rng(5)
    label_emb = unit(rng.normal(size=(6, 16)))
    targets = rng.random((300, 6)) < 0.3
    text = unit(targets @ label_emb + 0.5 * rng.normal(size=(300, 16)))
    first = write_run(tmp_path / "a", label_emb, text, targets)
    second = write_run(tmp_path / "b", label_emb, text, targets)
    shuffled = rng.permutation(300)
    write_text_embeddings(second / "text_emb/part-00000.parquet", [f"c{i:05d}" for i in shuffled], text[shuffled],
                          "float32")
    train_adapter(config(first))
    train_adapter(config(second))
    assert (first / "adapter/model.safetensors").read_bytes() == (second / "adapter/model.safetensors").read_bytes()


def test_float16_store_dtype_trains_nearly_the_same_adapter_from_half_the_memory(tmp_path):
    train_adapter(config(small_run(tmp_path / "a")))
    train_adapter(config(small_run(tmp_path / "b"), store_dtype="float16"))
    full, half = (json.loads((tmp_path / run / "adapter/config.json").read_text())["training"] for run in "ab")
    assert half["store_dtype"] == "float16"
    assert abs(half["best_val_mAP"] - full["best_val_mAP"]) < 0.01


def test_another_seed_gives_other_weights(tmp_path):
    run = small_run(tmp_path)
    train_adapter(config(run, seed=1))
    before = (run / "adapter/model.safetensors").read_bytes()
    train_adapter(config(run, seed=2))
    assert (run / "adapter/model.safetensors").read_bytes() != before


def test_unchanged_inputs_and_params_skip_the_stage(tmp_path):
    run = small_run(tmp_path)
    train_adapter(config(run))
    assert train_adapter(config(run)).status == "skipped"
    assert train_adapter(config(run, noise=0.1)).status == "ran"


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    run = small_run(tmp_path)
    train_adapter(config(run, epochs=30, patience=1, lr=3e-2))
    log = pq.read_table(run / "adapter/train_log.parquet").to_pylist()
    cfg = json.loads((run / "adapter/config.json").read_text())
    assert len(log) < 30
    best = cfg["training"]
    assert best["best_val_mAP"] == max(row["val_mAP"] for row in log)
    assert log[best["best_epoch"] - 1]["val_mAP"] == best["best_val_mAP"]


def test_missing_text_embeddings_name_the_stage_to_run(tmp_path):
    run = small_run(tmp_path)
    for part in (run / "text_emb").iterdir():
        part.unlink()
    with pytest.raises(OvmlError, match="ovml embed-text"):
        train_adapter(config(run))


def test_captions_without_an_embedding_are_a_one_line_error(tmp_path):
    run = small_run(tmp_path)
    table = pq.read_table(run / "text_emb/part-00000.parquet")
    pq.write_table(table.slice(0, 100), run / "text_emb/part-00000.parquet")
    with pytest.raises(OvmlError, match="200 captions have no text embedding"):
        train_adapter(config(run))


def test_a_clip_spec_other_than_the_one_that_embedded_the_captions_is_refused(tmp_path):
    run = small_run(tmp_path)
    (run / "manifest.json").write_text(json.dumps({"stages": {"embed_text": {"params": {"clip": "ViT-B-32:openai"}}}}))
    with pytest.raises(OvmlError, match="made with CLIP 'ViT-B-32:openai', not"):
        train_adapter(config(run))


def modality_gap_world(seed: int, dim: int = 32, labels: int = 8):
    """Label embeddings, a caption sampler and a fixed gap vector.

    Captions mix their labels' embeddings through a fixed confusion (learnable, and shared with images)
    and carry a faint text-only cue; "images" are the same captions shifted by one gap vector plus small
    noise that drowns the cue, then re-normalised.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    label_emb = unit(rng.normal(size=(labels, labels)) @ basis[:, :labels].T)
    cue = basis[:, labels:2 * labels].T
    confusion = np.eye(labels) + 0.5 * rng.normal(size=(labels, labels))
    gap = unit(rng.normal(size=dim))

    def captions(n: int) -> tuple[np.ndarray, np.ndarray]:
        targets = rng.random((n, labels)) < 0.25
        text = (targets @ confusion @ label_emb + 0.3 * rng.normal(size=(n, labels)) @ label_emb
                + 0.5 * targets @ cue)
        return unit(text), targets

    def images_of(text: np.ndarray) -> np.ndarray:
        return unit(text + gap + 0.3 * rng.normal(size=text.shape))

    return label_emb, captions, images_of


def test_noise_makes_a_text_trained_adapter_transfer_across_a_simulated_modality_gap(tmp_path):
    """A simulation, not evidence on real CLIP: with image-like vectors that sit off the captions' manifold
    (shifted by a fixed gap, jittered), the adapter trained with noise ranks them clearly better than the
    one trained on clean text, which leans on text-only detail. The margin holds for every seed."""
    margins = []
    for seed in range(3):
        label_emb, captions, images_of = modality_gap_world(seed)
        text, targets = captions(1000)
        test_text, test_targets = captions(1000)
        images = torch.from_numpy(images_of(test_text))
        image_map = {}
        for noise in (0.0, 0.3):
            run = write_run(tmp_path / f"seed{seed}-noise{noise}", label_emb, text, targets)
            train_adapter(config(run, noise=noise, hidden=64, epochs=15, batch_size=128, lr=1e-2, seed=seed))
            model, _ = load_adapter(run / "adapter", CLIP, 32)
            with torch.inference_mode():
                scores = model(images, torch.from_numpy(label_emb)).numpy()
            image_map[noise] = mean_average_precision(average_precision(scores, test_targets))
        margins.append(image_map[0.3] - image_map[0.0])
    assert min(margins) > 0.02, margins
    assert np.mean(margins) > 0.03, margins


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--lr", "nan"), ("--noise", "inf"), ("--noise", "nan"),
                                         ("--device", "cuda"), ("--store-dtype", "int8")])
def test_a_bad_setting_is_a_one_line_error_that_keeps_the_trained_adapter(tmp_path, flag, value):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = small_run(tmp_path)
    train_adapter(config(run))
    before = {p.name: p.read_bytes() for p in (run / "adapter").iterdir()}
    result = CliRunner().invoke(app, ["train-adapter", "--run-dir", str(run), "--clip", CLIP, "--hidden", "32",
                                      "--epochs", "3", "--batch-size", "64", flag, value])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
    assert {p.name: p.read_bytes() for p in (run / "adapter").iterdir()} == before


def local_head_map(run: Path, model) -> float:
    """mAP of the local head on the run's own caption tokens: how well it finds a caption's labels among its words."""
    from ovml.pipeline.text_embeddings import read_token_features

    features = read_token_features(run / "text_emb")
    words, real = features.padded(np.arange(len(features.offsets) - 1))
    captions = pq.read_table(run / "captions/part-00000.parquet").to_pylist()
    vocabulary = json.loads((run / "captions/vocabulary.json").read_text())["labels"]
    truth = np.array([[label in row["labels"] for label in vocabulary] for row in captions])
    label_emb = torch.from_numpy(np.array(pq.read_table(run / "labels/train.parquet")["embedding"].to_pylist(),
                                          dtype=np.float32))
    with torch.inference_mode():
        scores = model.local_logits(model.local_features(torch.from_numpy(words).float()), label_emb,
                                      torch.from_numpy(real)).numpy()
    return mean_average_precision(average_precision(scores, truth))


def test_local_trains_a_head_that_finds_a_captions_labels_among_its_words_where_zero_shot_cannot(tmp_path):
    from ovml.pipeline.adapter import Adapter

    run = local_run(tmp_path)
    train_adapter(config(run, local=True, epochs=30, patience=30, lr=1e-2))
    model, adapter_config = load_adapter(run / "adapter", CLIP, 16)
    assert adapter_config.local_pooling == "top-k"
    untrained = Adapter(adapter_config).eval()
    assert local_head_map(run, model) > local_head_map(run, untrained) + 0.3


def test_local_without_token_features_is_a_one_line_error_that_keeps_the_trained_adapter(tmp_path):
    run = small_run(tmp_path)
    train_adapter(config(run))
    before = (run / "adapter/model.safetensors").read_bytes()
    with pytest.raises(OvmlError, match="embed-text --local"):
        train_adapter(config(run, local=True))
    assert (run / "adapter/model.safetensors").read_bytes() == before


def test_an_adapter_trained_without_local_records_no_local_setting(tmp_path):
    """So adapters trained before --local existed keep their fingerprint and are not retrained."""
    run = small_run(tmp_path)
    train_adapter(config(run))
    params = json.loads((run / "manifest.json").read_text())["stages"]["train_adapter"]["params"]
    assert not {"local", "local_pooling", "local_top_k"} & set(params)
