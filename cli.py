"""ovml command line: parse options, call one stage, print its outcome. No logic lives here."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from ovml.pipeline.config import build_config, read_config_file
from ovml.pipeline.errors import OvmlError, environment_error
from ovml.pipeline.settings import STAGES, Stage

app = typer.Typer(
    name="ovml",
    help="Train an open-vocabulary multi-label image classifier from LLM-written text alone.\n\n"
    "Pipeline: generate-text -> embed-text -> train-adapter; embed-images -> eval; or all of it with `run`.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with a \\[section] per stage; "
                                                 "flags given here override it.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON line.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"ovml {metadata.version('ovml')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Exit codes: 0 ok, 1 a stage failed, 2 usage or config error, 75 run directory locked."""


def _parameter(field: dataclasses.Field, hint: Any) -> inspect.Parameter:
    """A config field as a Typer option (or argument): flag, help and the default --help shows, from its metadata."""
    meta = field.metadata
    if meta["argument"]:
        annotation = Annotated[hint, typer.Argument(help=meta["help"], show_default=False)]
        return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    arms = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    kind = str if typing.get_origin(arms[0]) is Literal else arms[0]  # choices are checked by build_config
    default = meta["shown"] or (None if field.default in (None, "") or kind is bool else field.default)
    shown = f" \\[default: {default}]" if default is not None else ""
    flag = meta["flag"] or ("--" + field.name.replace("_", "-") if kind is bool else None)
    option = typer.Option(*([flag] if flag else []), help=meta["help"] + shown, show_default=False)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])


def _command(stage: Stage, call: Callable[[Stage, dict[str, Any], bool], None], json_flag: bool) -> Callable:
    """The Typer command of a stage: its options built from the stage's config, then `call(stage, options, json)`."""
    hints = typing.get_type_hints(stage.config)
    parameters = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
                  *(_parameter(f, hints[f.name]) for f in dataclasses.fields(stage.config) if f.metadata["cli"])]
    if json_flag:
        parameters.append(inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False,
                                            annotation=JsonOpt))

    def command(**options: Any) -> None:
        json_out = options.pop("json_out", False)
        call(stage, options, json_out)

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = stage.help
    command.__name__ = stage.section
    return command


def _call_stage(stage: Stage, options: dict[str, Any]):
    """Build the stage config (file <- flags), run the stage, print its outcome; errors become one line."""
    config_path = options.pop("config", None)
    cfg = None
    try:
        cfg = build_config(stage.config, stage.section, read_config_file(config_path), options,
                           source=str(config_path or "config"))
        outcome = stage.load()(cfg)
    except OvmlError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        _environment_fault(e, getattr(cfg, "run_dir", None))
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume")
        raise typer.Exit(130) from None
    _print_outcome(outcome)
    return outcome


def _environment_fault(e: OSError, run_dir: Path | None) -> None:
    """A full disk or an unwritable run directory: one line naming it and the fix; the traceback to a log."""
    from ovml.pipeline.logs import write_traceback

    error = environment_error(e)
    if error is None:
        raise e
    log = write_traceback(run_dir)
    err.print(f"[bold red]error:[/] {escape(str(error))} (traceback in {log})", highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code) from None


def _print_outcome(outcome) -> None:
    from ovml.pipeline.rundir import StageOutcome

    if not isinstance(outcome, StageOutcome):
        return
    out.print(f"[bold]{outcome.stage}[/]: {outcome.status} ({outcome.reason}) in {outcome.seconds:.1f}s")
    for key, value in outcome.summary.items():
        out.print(f"  {key}: {value}", highlight=False)


def _stage_command(stage: Stage, options: dict[str, Any], json_out: bool) -> None:
    result = _call_stage(stage, options)
    if stage.command == "predict":
        from ovml.pipeline.report import print_predictions

        print_predictions(result, json_out, out)
    elif stage.command == "search":
        from ovml.pipeline.report import print_search

        print_search(result, json_out, out)


def _run_command(stage: Stage, options: dict[str, Any], json_out: bool) -> None:
    from ovml.stages.run import run_command  # light: the stages are imported once the lock is held

    raise typer.Exit(run_command(options.pop("config", None), options["run_dir"], json_out))


for _stage in STAGES:
    _json = _stage.command in ("predict", "search", "run")
    app.command(_stage.command)(_command(_stage, _run_command if _stage.command == "run" else _stage_command, _json))


def console() -> None:
    """The `ovml` console script. After an interruption (Ctrl-C, a signal: exit codes above 128, the message already
    printed) the process exits at once: worker threads still waiting on a server that does not answer
    (generate-text's HTTP requests) would otherwise hold it for minutes at interpreter exit. Everything on disk was
    written atomically; the staging folder is where the next run resumes."""
    try:
        app()
    except SystemExit as e:
        if isinstance(e.code, int) and e.code > 128:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code)
        raise


if __name__ == "__main__":
    console()
