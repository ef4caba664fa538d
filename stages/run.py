"""run: every stage in order from one config, skipping what is up to date; safe to run from cron.

This is the one stage that imports the others: it is the orchestrator, and it passes nothing between
them but the run directory. Each stage decides for itself (manifest fingerprints) whether it must run.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ovml.pipeline.config import build_config, read_config_file
from ovml.pipeline.errors import EXIT_OK, EXIT_STAGE_FAILED, OvmlError, environment_error
from ovml.pipeline.logs import open_log
from ovml.pipeline.report import eval_tables
from ovml.pipeline.rundir import lock_run_dir
from ovml.pipeline.settings import STAGES, RunConfig

PIPELINE = [stage for stage in STAGES if stage.in_run]
NEEDS_SECTION = {"embed_images", "eval"}  # without a dataset there is nothing to embed or evaluate


def run(cfg: RunConfig, config_path: Path | None) -> int:
    """Run the pipeline; returns the exit code (0 ok, 1 a stage failed). Config errors raise before any work."""
    file_data = read_config_file(config_path)
    source = str(config_path or "config")
    plan = []
    for stage in PIPELINE:
        section, config_cls, entry = stage.section, stage.config, stage.load()
        if section in NEEDS_SECTION and section not in file_data:
            plan.append((section, None, entry))
            continue
        overrides = {"run_dir": cfg.run_dir}
        if section == "eval" and "dataset" not in file_data.get("eval", {}):
            overrides["dataset"] = file_data.get("embed_images", {}).get("dataset")
        plan.append((section, build_config(config_cls, section, file_data, overrides, source=source), entry))

    eval_cfg = {section: stage_cfg for section, stage_cfg, _ in plan}["eval"]
    console = Console(stderr=cfg.json)
    with lock_run_dir(cfg.run_dir, f"ovml run --config {config_path}"):
        log = open_log(cfg.run_dir)
        log.info("ovml run --config %s --run-dir %s", config_path, cfg.run_dir)
        results, exit_code, t0 = [], EXIT_OK, time.perf_counter()
        for section, stage_cfg, entry in plan:
            name = section.replace("_", "-")
            if stage_cfg is None:
                results.append({"stage": name, "status": "skipped", "reason": f"no [{section}] section",
                                "seconds": 0.0})
                log.info("%s: skipped (no [%s] section)", name, section)
                continue
            console.rule(f"[bold]{name}")
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
        summary = {"run_dir": str(cfg.run_dir), "exit_code": exit_code,
                   "seconds": round(time.perf_counter() - t0, 3), "stages": results,
                   "metrics": _key_metrics(results)}
        log.info("summary %s", json.dumps(summary, default=str))
    _print_summary(console, results)
    if cfg.json:
        print(json.dumps(summary, default=str))
    elif exit_code == EXIT_OK and eval_cfg is not None:
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
