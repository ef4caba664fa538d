"""Where a stage's work runs, behind one interface: this process (`local`) or an actor pool on Ray (`ray`).

A stage hands the engine a worker class, the worker's constructor arguments and its work items (dicts, each with a
`unit` key: the file the item's output ends up in, an image chunk or a captions part). The worker is built once
per process that runs it (where it loads its model) and called with a pyarrow batch of items; it yields tables of
output rows, each table of one unit, in item order. The engine hands each unit's tables back in item order, so the
stage writes the same files the same way on either engine: the same bytes, the same manifest, and a killed run
resumes from the staged files either way.

On Ray, actors compute and the driver receives each finished unit. Ray restarts a lost actor and retries its task
(Ray Data's actor pool default); work that never reached the driver is simply redone by the next run.
"""

from __future__ import annotations

import contextlib
import socket
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from ovml.pipeline.errors import OvmlError

UNIT = "unit"  # the column every work item and every output row carries
ERROR = "ovml_error"  # the column of an actor's answer when it met a user error instead
Units = Iterator[tuple[Hashable, Iterator[pa.Table]]]


def open_engine(name: str, *, address: str = "auto", actors: int = 1, device: str = "cpu") -> LocalEngine | RayEngine:
    """The one place an engine name becomes an engine (`with open_engine(...) as engine:`)."""
    return RayEngine(address, actors, device) if name == "ray" else LocalEngine()


class LocalEngine:
    """The worker runs in this process, over all items in one call, so it can pipeline across units (decode
    workers ahead of the model, an LLM's batch slots refilled across parts); its output streams back lazily.
    One worker serves every call with the same arguments (generate-text's rounds open their model once)."""

    def __init__(self):
        self._worker: tuple[type, tuple, Any] | None = None

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self._worker = None

    def map(self, worker: type, args: tuple, items: list[dict], *, expected: dict | None = None,
            batch_size: int = 1) -> Units:
        """(unit, its output tables) per unit, in item order; a unit's tables arrive as the worker makes them, and
        a unit is handed over as soon as its last row is made (not when the next unit's first one is)."""
        if not items:
            return
        expected = expected or Counter(item[UNIT] for item in items)
        if self._worker is None or self._worker[:2] != (worker, args):
            self._worker = None  # the old model goes before the new one loads
            self._worker = (worker, args, worker(*args))
        outputs = iter(self._worker[2](pa.Table.from_pylist(items)))
        for unit in dict.fromkeys(item[UNIT] for item in items):
            tables = _take_rows(outputs, expected[unit])
            yield unit, tables
            for _ in tables:  # what the stage left unread of this unit
                pass


def _take_rows(outputs: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    while rows > 0:
        table = next(outputs)
        rows -= table.num_rows
        yield table


class RayEngine:
    """Actors on a Ray cluster (or a local Ray started for the stage), `actors` of them, one GPU each on CUDA.

    `expected[unit]` is how many output rows make a unit complete (one per item when not given); `batch_size`
    items go to an actor per call. Actors run as many torch threads as this process (OMP_NUM_THREADS): a float
    sum's rounding depends on how it is split over threads, and this way an actor's output equals the local
    engine's bit for bit.
    """

    def __init__(self, address: str, actors: int, device: str):
        self.address, self.actors, self.device = address, actors, device
        self._session: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> RayEngine:
        self._session = ray_session(self.address)
        self._session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._session.__exit__(*exc)

    def map(self, worker: type, args: tuple, items: list[dict], *, expected: dict | None = None,
            batch_size: int = 1) -> Units:
        if not items:
            return
        ray = _import_ray()
        expected = expected or Counter(item[UNIT] for item in items)
        dataset = worker.ray_dataset(ray, items, args, self.actors) if hasattr(worker, "ray_dataset") else None
        if dataset is None:
            dataset = ray.data.from_items(items).map_batches(
                _Actor, fn_constructor_args=(worker, args), batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=self.actors), num_cpus=1,
                num_gpus=actor_gpus(ray, self.device),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}},
            )
        arrived, stream = {}, _gather(dataset, expected)
        for unit in dict.fromkeys(item[UNIT] for item in items):  # completion order -> item order
            while unit not in arrived:
                done, table = next(stream)
                arrived[done] = table
            yield unit, iter([arrived.pop(unit)])


def unit_rows(tables: Iterator[pa.Table]) -> pa.Table:
    """A unit's output tables as one table, without the engine's `unit` column, each column in one chunk."""
    return pa.concat_tables(list(tables)).drop_columns([UNIT]).combine_chunks()


def check_engine(engine: str) -> None:
    """Before a stage touches its run directory: Ray installed when it is asked for."""
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
        if address not in ("auto", "local"):
            _check_reachable(address)
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


RAY_PORTS = {"": 6379, "ray://": 10001}  # Ray's default GCS port, and its client server's
CONNECT_TIMEOUT = 5.0


def _check_reachable(address: str) -> None:
    """One TCP connection to the cluster's address first: ray.init retries a dead address for minutes (20 tries
    of ~65 s here), which a cron job would spend waiting. A reachable port that is not Ray still goes to Ray."""
    scheme = "ray://" if address.startswith("ray://") else ""
    host, colon, port = address.removeprefix(scheme).rpartition(":")
    if not colon:
        host, port = port, ""
    try:
        with socket.create_connection((host.strip("[]"), int(port or RAY_PORTS[scheme])), timeout=CONNECT_TIMEOUT):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise OvmlError(f"cannot join the Ray cluster at {address} ({reason}); start one with `ray start --head` "
                        "there, or use --ray-address auto") from None


def actor_gpus(ray, device: str) -> int:
    """One GPU per actor when the stage runs on CUDA (device cuda, or auto on a cluster that has GPUs)."""
    if device == "auto":
        return int(ray.cluster_resources().get("GPU", 0) >= 1)
    return int(device.startswith("cuda"))


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
                return pa.concat_tables(list(self.worker(batch)))
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
