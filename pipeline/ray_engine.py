"""The ray engine: a stage's units of work spread over an actor pool with Ray Data, on one machine or a cluster.

A unit is what the local engine writes as one file (an image chunk, a captions part) or one prompt of a part.
Actors compute; the driver receives each finished unit and writes it with the same code as the local engine
(into the stage's staging folder), so both engines make the same files, the manifest is the same, and a
killed driver resumes from the staged files either way. Ray restarts a lost actor and retries its task
(Ray Data's actor pool default); work that never reached the driver is simply redone by the next run.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Hashable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.llm import CAPTION_SCHEMA, ChatRequest, LlamaCppBackend, Sampling, open_backend

UNIT = "unit"  # the column every work item and every actor output row carries
ERROR = "ovml_error"  # the column of an actor's answer when it met a user error instead


def check_engine(engine: str, actors: int) -> None:
    """Before a stage touches its run directory: a usable pool size, and Ray installed when it is asked for."""
    if actors < 1:
        raise OvmlError(f"--ray-actors must be at least 1, got {actors}")
    if engine == "ray":
        _import_ray()


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise OvmlError("--engine ray needs Ray Data: pip install 'ovml[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """Join the Ray cluster at `address`; with "auto", the running one (RAY_ADDRESS or `ray start` on this
    machine) or else a local Ray that lives as long as the stage. A Ray this process already joined is reused."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "auto" else address, include_dashboard=False,
                     log_to_driver=False, logging_level="warning")
        except (ConnectionError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise OvmlError(f"cannot join the Ray cluster at {address} ({first}); start one with `ray start "
                            "--head` or use --ray-address auto") from None
        started = True
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the stage draws its own progress bar
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def actor_gpus(ray, device: str) -> int:
    """One GPU per actor when the stage runs on CUDA (device cuda, or auto on a cluster that has GPUs)."""
    if device == "auto":
        return int(ray.cluster_resources().get("GPU", 0) >= 1)
    return int(device.startswith("cuda"))


def ray_map(items: list[dict], expected: dict[Hashable, int], worker: type, worker_args: tuple, *,
            address: str, actors: int, device: str = "cpu", batch_size: int = 1) -> Iterator[tuple[Any, pa.Table]]:
    """Run `worker(*worker_args)` actors over `items`; yield (unit, its output rows) as each unit completes.

    `items` are dicts with a `unit` key; `expected[unit]` is how many output rows make that unit complete.
    A worker's __call__ takes a pyarrow batch of items and returns a pyarrow table with a `unit` column.
    Units arrive in completion order, not item order; a unit's rows may come in several batches.
    Actors run as many torch threads as this process (OMP_NUM_THREADS): a float sum's rounding depends on
    how it is split over threads, and this way an actor's embeddings equal the local engine's bit for bit.
    """
    with ray_session(address) as ray:
        dataset = ray.data.from_items(items).map_batches(
            _Actor, fn_constructor_args=(worker, worker_args), batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=actor_gpus(ray, device),
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}},
        )
        yield from _gather(dataset, expected)


class _Actor:
    """Holds one worker and sends its user errors (a missing model file, say) to the driver as data: Ray hands
    the driver an actor's exceptions as traceback text only, and the user should get the one-line message."""

    def __init__(self, worker: type, worker_args: tuple):
        self.error: str | None = None
        try:
            self.worker = worker(*worker_args)
        except OvmlError as e:
            self.error = str(e)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.error is None:
            try:
                return self.worker(batch)
            except OvmlError as e:
                self.error = str(e)
        return pa.table({UNIT: batch[UNIT], ERROR: pa.array([self.error] * batch.num_rows, pa.string())})


def _gather(dataset, expected: dict[Hashable, int]) -> Iterator[tuple[Any, pa.Table]]:
    """Stream the dataset's output and hand out each unit once all its rows are in."""
    pending: dict[Hashable, list[pa.Table]] = defaultdict(list)
    counts: dict[Hashable, int] = defaultdict(int)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        if ERROR in batch.column_names:
            raise OvmlError(batch[ERROR][0].as_py())
        for unit in pc.unique(batch[UNIT]).to_pylist():
            rows = batch.filter(pc.equal(batch[UNIT], unit))
            pending[unit].append(rows)
            counts[unit] += rows.num_rows
            if counts[unit] == expected[unit]:
                yield unit, pa.concat_tables(pending.pop(unit))


def ray_chat(requests: dict[Hashable, list[ChatRequest]], backend: str, model: str | None, base_url: str | None,
             sampling: Sampling, concurrency: int, extra_body: dict | None, threads: int, *, address: str,
             actors: int) -> Iterator[tuple[Any, list[str], str, str | None]]:
    """(unit, raw answers in request order, model, structured-output dialect) per unit of chat requests.

    llama-cpp and openai run the local backends inside actors (one model or client each, on CPUs); vllm goes
    through Ray Data's LLM processor, one engine replica per GPU.
    """
    items = [{UNIT: unit, "index": i, "messages": json.dumps(request.messages), "seed": request.seed}
             for unit, unit_requests in requests.items() for i, request in enumerate(unit_requests)]
    expected = {unit: len(unit_requests) for unit, unit_requests in requests.items()}
    if backend == "vllm":
        tables = _vllm_map(items, expected, model, sampling, address=address, actors=actors)
    else:
        batch_size = concurrency if backend == "openai" else LlamaCppBackend.SEQUENCES  # decoded together
        tables = ray_map(items, expected, LlmWorker, (backend, model, base_url, sampling, concurrency, extra_body,
                                                      threads), address=address, actors=actors, batch_size=batch_size)
    for unit, table in tables:
        rows = table.sort_by("index")
        yield unit, rows["raw"].to_pylist(), rows["model"][0].as_py(), rows["dialect"][0].as_py()


class LlmWorker:
    """A Ray actor holding one local LLM backend (a llama.cpp model, or an OpenAI-compatible client)."""

    def __init__(self, *backend_args):
        self.backend = open_backend(*backend_args)

    def __call__(self, batch: pa.Table) -> pa.Table:
        requests = [ChatRequest(tuple(tuple(turn) for turn in json.loads(messages)), seed)
                    for messages, seed in zip(batch["messages"].to_pylist(), batch["seed"].to_pylist(), strict=True)]
        raw = list(self.backend.complete(requests))
        return pa.table({UNIT: batch[UNIT], "index": batch["index"], "raw": pa.array(raw, pa.string()),
                         "model": [self.backend.model] * len(raw),
                         "dialect": pa.array([getattr(self.backend, "dialect", None)] * len(raw), pa.string())})


def _vllm_map(items: list[dict], expected: dict[Hashable, int], model: str | None, sampling: Sampling, *,
              address: str, actors: int) -> Iterator[tuple[Any, pa.Table]]:
    """Ray Data's vLLM processor (ray.data.llm), with the local vllm backend's prompts, seeds and JSON schema.

    Not run on the development machine (no GPU); tests/test_gpu.py runs it where CUDA exists.
    """
    if not model:
        raise OvmlError("--backend vllm needs --model, a Hugging Face model id or a local model folder")
    with ray_session(address) as ray:
        try:
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig
        except ImportError:
            raise OvmlError("--backend vllm on Ray needs vLLM and Ray's LLM support: install ovml with the "
                            "`gpu` extra (make install-gpu)") from None
        processor = build_processor(
            vLLMEngineProcessorConfig(model_source=model, concurrency=actors, batch_size=64),
            preprocess=lambda row: {
                "messages": [{"role": role, "content": content} for role, content in json.loads(row["messages"])],
                "sampling_params": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                    "max_tokens": sampling.max_tokens, "seed": int(row["seed"]),
                                    "structured_outputs": {"json": CAPTION_SCHEMA}},
            },
            postprocess=lambda row: {UNIT: row[UNIT], "index": row["index"], "raw": row["generated_text"],
                                     "model": model, "dialect": None},
        )
        dataset = processor(ray.data.from_items(items))
        yield from _gather(dataset, expected)
