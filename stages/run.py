"""run: every stage in order from one config, skipping what is up to date; safe to run from cron.

This is the one stage that imports the others: it is the orchestrator, and it passes nothing between
them but the run directory. Each stage decides for itself (manifest fingerprints) whether it must run.

Nothing is spent before a refusal: the run directory's lock is taken before the stages are imported (seconds
of torch and open_clip), so a second run exits 75 at once; then every configured stage's settings, input files
and CLIP spec are checked (each stage module's `check`) before the first stage runs, so a typo in the last stage
costs no LLM time. With --json exactly one summary line is printed on every exit: done, a failed stage, a config
error, the lock, a crash, or a signal (SIGHUP 129, SIGINT 130, SIGTERM 143; the stage it stopped keeps its
staging and resumes on the next run).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ovml.pipeline.artifacts import image_cache
from ovml.pipeline.config import build_config, read_config_file
from ovml.pipeline.datasets import cache_name
from ovml.pipeline.errors import EXIT_OK, EXIT_STAGE_FAILED, OvmlError, environment_error
from ovml.pipeline.logs import open_log, write_traceback
from ovml.pipeline.rundir import LOCK, lock_run_dir
from ovml.pipeline.settings import STAGES, RunConfig

NEEDS_SECTION = {"embed_images", "eval"}  # without a dataset there is nothing to embed or evaluate
SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)  # each ends the run with exit code 128 + its number


class Stopped(BaseException):
    """A signal ended the run (a BaseException, like KeyboardInterrupt, so no stage's error handling takes it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _pipeline() -> list[tuple[str, type, Any, Any]]:
    """(section, config class, entry, check) of every stage `run` runs, in order. Imported here, after the lock is
    taken: these imports take seconds, which a second run must not spend before it finds the lock held."""
    return [(stage.section, stage.config, stage.load(), stage.load("check")) for stage in STAGES if stage.in_run]


def run_command(config_path: Path | None, run_dir: Path | None, json_out: bool) -> int:
    """`ovml run`: the exit code. Errors are one line on stderr; with --json one summary line on stdout, always."""
    summary: dict[str, Any] = {"run_dir": str(run_dir) if run_dir else None, "exit_code": None, "stages": []}
    console = Console(stderr=json_out)
    with _signals_stop_the_run():
        try:
            try:
                cfg = build_config(RunConfig, "run", read_config_file(config_path),
                                   {"run_dir": run_dir, "json": json_out}, source=str(config_path or "config"))
                summary["run_dir"] = str(cfg.run_dir)
                summary["exit_code"] = run(cfg, config_path, summary, console)
            except OvmlError as e:
                _refused(summary, e.exit_code, str(e))
            except Stopped as e:
                _stopped(summary, e)
            except Exception as e:  # noqa: BLE001 - one line here, the traceback to a log
                error = environment_error(e) if isinstance(e, OSError) else None  # e.g. a full disk at the lock
                if error is not None:
                    _refused(summary, error.exit_code, f"{error} (traceback in {write_traceback(_run_dir(summary))})")
                else:  # a bug outside the stages
                    _refused(summary, EXIT_STAGE_FAILED, f"ovml run crashed: {type(e).__name__}: {e} "
                                                         f"(traceback in {write_traceback(_run_dir(summary))})")
        except Stopped as e:  # arrived while an error above was being reported
            _stopped(summary, e)
        if json_out:
            print(json.dumps(summary, default=str), flush=True)
    return summary["exit_code"]


def _run_dir(summary: dict[str, Any]) -> Path | None:
    return Path(summary["run_dir"]) if summary["run_dir"] else None


def _refused(summary: dict[str, Any], exit_code: int, message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    summary.update(exit_code=exit_code, error=message)


def _stopped(summary: dict[str, Any], stop: Stopped) -> None:
    if summary["exit_code"] is None or summary["exit_code"] == EXIT_OK:
        message = f"stopped by {stop}; run the same command again to resume"
        print(f"ovml run: {message}", file=sys.stderr, flush=True)
        summary.update(exit_code=stop.exit_code, error=message)


@contextlib.contextmanager
def _signals_stop_the_run() -> Iterator[None]:
    """SIGHUP, SIGINT and SIGTERM raise Stopped, once: a second signal while the first is being reported is
    only noted, so the summary line is still printed. Signals the caller ignores (nohup, `cmd &`) stay ignored."""
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        if len(received) == 1:
            raise Stopped(signum)

    previous = {}
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(cfg: RunConfig, config_path: Path | None, summary: dict[str, Any], console: Console) -> int:
    """Run the pipeline, filling `summary`; returns the exit code (0 ok, 1 a stage failed). The lock, then every
    config error and every stage's check, before any work."""
    file_data = read_config_file(config_path)
    source = str(config_path or "config")
    missing = [d for d in (cfg.run_dir, *cfg.run_dir.parents) if not d.exists()]  # innermost first
    with lock_run_dir(cfg.run_dir, f"ovml run --config {config_path}"):
        try:
            plan = _checked_plan(cfg, file_data, source, summary)
        except OvmlError:
            if missing:  # a refused start leaves no folder behind, its parents (runs/) included
                with contextlib.suppress(OSError):
                    (cfg.run_dir / LOCK).unlink()
                    for folder in missing:
                        folder.rmdir()
            raise
        return _run_plan(cfg, config_path, plan, summary, console)


def _checked_plan(cfg: RunConfig, file_data: dict, source: str, summary: dict[str, Any]) -> list:
    """(section, config or None, entry) per stage, once every configured stage's config is built and checked."""
    plan = []
    for section, config_cls, entry, check in _pipeline():
        if section in NEEDS_SECTION and section not in file_data:
            plan.append((section, None, entry, check))
            continue
        overrides = {"run_dir": cfg.run_dir}
        if section == "eval" and "dataset" not in file_data.get("eval", {}):
            overrides["dataset"] = file_data.get("embed_images", {}).get("dataset")
        plan.append((section, build_config(config_cls, section, file_data, overrides, source=source), entry, check))
    configs = {section: stage_cfg for section, stage_cfg, _, _ in plan}
    for section, stage_cfg, _, check in plan:
        try:
            if stage_cfg is not None:
                check(stage_cfg)
            if section == "eval" and stage_cfg is not None:
                _check_eval_images(stage_cfg, configs["embed_images"])
        except OvmlError as e:
            summary["stages"].append({"stage": section.replace("_", "-"), "status": "failed",
                                      "reason": f"checked before any stage ran: {e}", "seconds": 0.0})
            raise
    return [(section, stage_cfg, entry) for section, stage_cfg, entry, _ in plan]


def _check_eval_images(evaluation, embedding) -> None:
    """eval reads images/<dataset>/: made by this run's [embed_images] or already there, else no LLM time is spent."""
    if embedding is not None and cache_name(embedding.dataset, embedding.split) == evaluation.dataset:
        return
    cache = Path(evaluation.run_dir) / image_cache(evaluation.dataset)
    if not (cache / "dataset.json").is_file():
        raise OvmlError(f"[eval] scores the {evaluation.dataset} images, and {cache} holds no image cache that "
                        f"[embed_images] would make; add an [embed_images] section with dataset = "
                        f"\"{evaluation.dataset}\" and its root (or run `ovml embed-images` first)")


def _run_plan(cfg: RunConfig, config_path: Path | None, plan: list, summary: dict[str, Any], console: Console) -> int:
    log = open_log(cfg.run_dir)
    log.info("ovml run --config %s --run-dir %s", config_path, cfg.run_dir)
    results, exit_code, t0 = summary["stages"], EXIT_OK, time.perf_counter()
    try:
        for section, stage_cfg, entry in plan:
            name = section.replace("_", "-")
            if stage_cfg is None:
                results.append({"stage": name, "status": "skipped", "reason": f"no [{section}] section",
                                "seconds": 0.0})
                log.info("%s: skipped (no [%s] section)", name, section)
                continue
            console.rule(f"[bold]{name}")
            started = time.perf_counter()
            try:
                try:
                    outcome = entry(stage_cfg)
                except OSError as e:  # a full disk, a read-only folder: one line here, the traceback to the log
                    error = environment_error(e)
                    if error is None:
                        raise
                    log.error("%s: %s\n%s", name, error, traceback.format_exc())
                    raise error from None
            except OvmlError as e:
                results.append({"stage": name, "status": "failed", "reason": str(e), "seconds": 0.0})
                log.error("%s: failed: %s", name, e)
                console.print(f"[bold red]{name} failed:[/] {escape(str(e))}", highlight=False)
                exit_code = EXIT_STAGE_FAILED
                break
            except Stopped as e:
                results.append({"stage": name, "status": "interrupted", "reason": f"stopped by {e}; run again to "
                                "resume", "seconds": round(time.perf_counter() - started, 3)})
                log.error("%s: stopped by %s", name, e)
                raise
            except Exception as e:  # noqa: BLE001 - a bug in a stage: full traceback to the log, one line here
                log.error("%s: crashed\n%s", name, traceback.format_exc())
                results.append({"stage": name, "status": "failed", "reason": f"{type(e).__name__}: {e}",
                                "seconds": 0.0})
                console.print(f"[bold red]{name} crashed:[/] {escape(type(e).__name__ + ': ' + str(e))} "
                              f"(traceback in {log.handlers[0].baseFilename})", highlight=False)
                exit_code = EXIT_STAGE_FAILED
                break
            results.append({"stage": name, "status": outcome.status, "reason": outcome.reason,
                            "seconds": round(outcome.seconds, 3), "summary": outcome.summary})
            log.info("%s: %s (%s) in %.1fs %s", name, outcome.status, outcome.reason, outcome.seconds,
                     json.dumps(outcome.summary, default=str))
    finally:
        summary.update(exit_code=exit_code, seconds=round(time.perf_counter() - t0, 3), metrics=_key_metrics(results))
        log.info("summary %s", json.dumps(summary, default=str))
    _print_summary(console, results)
    eval_cfg = {section: stage_cfg for section, stage_cfg, _ in plan}["eval"]
    if not cfg.json and exit_code == EXIT_OK and eval_cfg is not None:
        from ovml.pipeline.report import eval_tables

        report = eval_cfg.run_dir / "eval" / eval_cfg.dataset / "report.json"
        console.rule(str(report.with_suffix(".md")))
        console.print(eval_tables(json.loads(report.read_text(encoding="utf-8"))), highlight=False, markup=False)
    return exit_code


def _key_metrics(results: list[dict]) -> dict:
    for result in results:
        if result["stage"] == "eval":
            return result.get("summary", {})
    return {}


def _print_summary(console: Console, results: list[dict]) -> None:
    table = Table(title="ovml run")
    for column in ("stage", "status", "why", "seconds"):
        table.add_column(column)
    for r in results:
        table.add_row(r["stage"], r["status"], escape(r["reason"]), f"{r['seconds']:.1f}")
    console.print(table)
