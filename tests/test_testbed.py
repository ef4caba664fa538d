"""The testbed CLIP: trained here on Fashion-MNIST *train* mosaics, deterministic, loadable through --clip."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import build_adapter, build_cache, fashion_mnist_release

import ovml.pipeline.testbed as testbed
from ovml.pipeline.clip import TINY_ARCH, load_clip
from ovml.pipeline.datasets import FASHION_MNIST_CLASSES
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.testbed import CaptionGrammar, PictureSampler, TestbedConfig, train_testbed
from ovml.stages.evaluate import EvalConfig, evaluate

TRAIN_CLASSES = [i % 10 for i in range(40)]


@pytest.fixture
def train_only_release(tmp_path):
    """A release holding the train split alone: training that touched the t10k files would fail."""
    return fashion_mnist_release(tmp_path / "fashion", TRAIN_CLASSES, split="train")


def tiny_recipe(root, out, **overrides):
    """The real training path on the tiny architecture: seconds, not minutes."""
    recipe = {"arch": TINY_ARCH, "steps": 3, "batch_size": 8, "warmup_steps": 1, "train_images": len(TRAIN_CLASSES)}
    return TestbedConfig(out=out, root=str(root), **{**recipe, **overrides})


def mentions(caption: str, class_id: int, grammar: CaptionGrammar) -> bool:
    names = [name for pair in grammar.names[class_id] for name in pair]
    return any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", caption) for name in names)


def test_grammar_has_thirty_templates_and_several_names_per_class():
    grammar = CaptionGrammar.load()
    assert len(grammar.templates) >= 30
    assert all(len(names) >= 3 for names in grammar.names)
    assert [pair[0][0] for pair in grammar.names] == FASHION_MNIST_CLASSES  # a label's first name is the label


def test_a_caption_names_every_item_of_its_picture():
    grammar, rng = CaptionGrammar.load(), np.random.default_rng(0)
    for _ in range(300):
        items = rng.integers(10, size=rng.integers(1, 5)).tolist()
        caption = grammar.caption(items, rng)
        assert all(mentions(caption, c, grammar) for c in set(items)), caption


def test_captions_of_one_picture_vary_in_wording():
    grammar, rng = CaptionGrammar.load(), np.random.default_rng(0)
    assert len({grammar.caption([4, 8], rng) for _ in range(200)}) > 100


def test_mosaics_hold_one_to_four_items_with_blank_cells(train_only_release):
    images = np.repeat((np.array(TRAIN_CLASSES, dtype=np.uint8) * 10 + 5)[:, None, None], 784, 1).reshape(-1, 28, 28)
    sampler = PictureSampler(images, np.array(TRAIN_CLASSES), TestbedConfig(single_fraction=0.0))
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        picture, items = sampler.sample(rng)
        pixels = np.asarray(picture.convert("L"))
        tiles = [int(pixels[y, x]) for y in (0, 28) for x in (0, 28)]
        assert sorted((v - 5) // 10 for v in tiles if v) == sorted(items)  # a blank cell is black
        counts.add(len(items))
    assert counts == {1, 2, 3, 4}


def test_training_writes_a_checkpoint_that_loads_through_clip(train_only_release, tmp_path):
    outcome = train_testbed(tiny_recipe(train_only_release, tmp_path / "testbed.safetensors"))
    assert outcome.status == "ran"
    encoder = load_clip(f"{TINY_ARCH}:{tmp_path / 'testbed.safetensors'}")
    assert encoder.random_weights is False
    assert "testbed" in encoder.description and "not comparable with published CLIP" in encoder.description
    assert encoder.encode_text(["a photo of a coat"]).shape == (1, encoder.dim)


def test_same_seed_gives_a_byte_identical_checkpoint(train_only_release, tmp_path):
    first = tmp_path / "a.safetensors"
    second = tmp_path / "b.safetensors"
    train_testbed(tiny_recipe(train_only_release, first))
    train_testbed(tiny_recipe(train_only_release, second))
    assert first.read_bytes() == second.read_bytes()
    train_testbed(tiny_recipe(train_only_release, tmp_path / "c.safetensors", seed=1))
    assert (tmp_path / "c.safetensors").read_bytes() != first.read_bytes()


def test_a_checkpoint_with_the_same_recipe_is_reused(train_only_release, tmp_path):
    out = tmp_path / "testbed.safetensors"
    train_testbed(tiny_recipe(train_only_release, out))
    assert train_testbed(tiny_recipe(train_only_release, out)).status == "skipped"
    assert train_testbed(tiny_recipe(train_only_release, out, steps=4)).status == "ran"


@pytest.mark.parametrize("out", ["a-file/testbed.safetensors", "a-folder"])
def test_an_unwritable_checkpoint_path_is_refused_before_training(train_only_release, tmp_path, out, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    monkeypatch.setattr(testbed, "_train", lambda *args: pytest.fail("trained before checking where to save"))
    with pytest.raises(OvmlError, match="cannot write the checkpoint .*; pass --out PATH in a writable folder"):
        train_testbed(tiny_recipe(train_only_release, tmp_path / out))


def test_training_reads_the_train_split_never_t10k(tmp_path):
    root = fashion_mnist_release(tmp_path / "fashion", TRAIN_CLASSES, split="t10k")
    with pytest.raises(OvmlError, match="train-images-idx3-ubyte.gz is missing"):
        train_testbed(tiny_recipe(root, tmp_path / "testbed.safetensors"))
    assert not (tmp_path / "testbed.safetensors").exists()


def test_an_eval_report_on_the_testbed_model_says_first_what_the_model_is(train_only_release, tmp_path):
    train_testbed(tiny_recipe(train_only_release, tmp_path / "testbed.safetensors"))
    clip, run_dir, labels = f"{TINY_ARCH}:{tmp_path / 'testbed.safetensors'}", tmp_path / "run", ["coat", "bag"]
    build_cache(run_dir, clip, "folder", labels, {"all": labels}, np.eye(2, dtype=bool)[[0, 1, 1]])
    build_adapter(run_dir, clip, vocabulary=labels)
    evaluate(EvalConfig(run_dir=run_dir, clip=clip, device="cpu", dataset="folder"))
    report = json.loads((run_dir / "eval/folder/report.json").read_text())
    assert report["random_weights"] is False
    first_line = (run_dir / "eval/folder/report.md").read_text().splitlines()[0]
    assert "testbed" in first_line and "not comparable with published CLIP results" in first_line


def test_the_256_d_testbed_architecture_differs_only_in_its_joint_space():
    import open_clip

    small, large = (open_clip.get_model_config(arch) for arch in ("ovml-testbed", "ovml-testbed-256"))
    assert (small["embed_dim"], large["embed_dim"]) == (128, 256)
    assert {**large, "embed_dim": 128} == small


def test_train_testbed_arch_flag_reaches_the_recipe(tmp_path):
    from test_cli import ovml

    result = ovml("train-testbed", "--arch", "no-such-arch", "--out", str(tmp_path / "t.safetensors"))
    assert result.returncode == 2
    assert "unknown CLIP architecture 'no-such-arch'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
