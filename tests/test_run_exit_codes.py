"""`ovml run` exit codes that cron relies on: 2 before any work for a bad config or a stage that cannot run, 1 when
a stage fails, 75 at once when the run directory is locked, 128 + N after signal N; one JSON line on every exit."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import pytest

OVML = [sys.executable, "-m", "ovml.cli"]


def run(config) -> subprocess.CompletedProcess:
    return subprocess.run([*OVML, "run", "--config", str(config), "--json"], capture_output=True, text=True)



@contextlib.contextmanager
def lock_held(run_dir: Path):
    """Another process holds `run_dir`'s lock while the block runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ovml.pipeline.rundir import lock_run_dir\n"
                               f"with lock_run_dir(Path({str(run_dir)!r}), 'test'):\n"
                               "    print('locked', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_bad_config_exits_2_before_any_stage_runs(tmp_path):
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n[train_adapter]\nnoise = "high"\n')
    result = run(config)
    assert result.returncode == 2 and "'noise' in [train_adapter]" in result.stderr
    assert not (tmp_path / "run").exists()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["exit_code"] == 2 and "'noise' in [train_adapter]" in summary["error"]


def test_a_locked_run_directory_exits_75_with_a_json_line(tmp_path):
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n')
    with lock_held(tmp_path / "run"):
        result = run(config)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 75 and summary["exit_code"] == 75 and "locked" in summary["error"]


def test_failing_stage_exits_1_with_a_json_summary_and_a_log(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nclip = "ViT-B-32:random"\n[generate_text]\n'
                      f'labels = "{tmp_path / "labels.txt"}"\nbackend = "vllm"\nmodel = "some/model"\n')  # no vLLM
    result = run(config)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 1 and summary["exit_code"] == 1
    (row,) = summary["stages"]
    assert (row["stage"], row["status"]) == ("generate-text", "failed") and "vllm" in row["reason"].lower()
    (log,) = (tmp_path / "run" / "logs").glob("*.log")
    assert "generate-text: failed" in log.read_text()


def test_a_later_stage_that_cannot_run_stops_the_run_before_the_first_stage(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nclip = "ViT-B-32:{tmp_path / "missing.safetensors"}"\n'
                      f'[generate_text]\nlabels = "{tmp_path / "labels.txt"}"\nbackend = "vllm"\n')
    result = run(config)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 2 and summary["exit_code"] == 2 and "Traceback" not in result.stderr
    assert f"CLIP checkpoint {tmp_path / 'missing.safetensors'} does not exist" in summary["error"]
    assert [(r["stage"], r["status"]) for r in summary["stages"]] == [("embed-text", "failed")]
    assert not (tmp_path / "run").exists()


def test_a_second_run_exits_75_before_it_imports_the_stages(tmp_path):
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n')
    with lock_held(tmp_path / "run"):
        result = subprocess.run([*OVML, "run", "--config", str(config), "--json"], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import")}
    assert result.returncode == 75 and json.loads(result.stdout.strip().splitlines()[-1])["exit_code"] == 75
    assert "ovml.stages.run" in imported and not imported & {"torch", "open_clip", "ovml.stages.generate_text"}


SIGNALLED_RUN = """
import os, sys, time
from dataclasses import dataclass
from pathlib import Path

import ovml.stages.run as run
from ovml.cli import app
from ovml.pipeline.rundir import StageOutcome

moment, signum, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]


@dataclass
class Config:
    run_dir: Path = Path("runs/default")


def at(point):
    if point == moment:
        if signum:
            os.kill(os.getpid(), signum)
            time.sleep(10)  # the signal is handled here
        raise RuntimeError("a bug outside the stages")


def check(cfg):
    at("check")


def entry(cfg):
    at("stage")
    return StageOutcome("generate_text", "ran", "never ran", 0.0, {})


real_print = run._print_summary
run._pipeline = lambda: [("generate_text", Config, entry, check)]
run._print_summary = lambda console, results: (at("summary"), real_print(console, results))
app(["run", "--run-dir", run_dir, "--json"])
"""


def as_from_a_terminal() -> None:
    """The signals at their defaults, as a command typed in a terminal has them. Under nohup (SIGHUP ignored) or
    from a shell's background job (SIGINT ignored) the child would inherit them ignored, which `ovml run` honours."""
    for signum in (signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("moment, signum", [
    *[("stage", s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)],
    ("check", signal.SIGTERM), ("summary", signal.SIGTERM), ("check", signal.SIGINT), ("summary", signal.SIGHUP),
    ("summary", 0),  # 0: a crash (an exception) instead of a signal
], ids=lambda v: v if isinstance(v, str) else (signal.Signals(v).name if v else "crash"))
def test_run_json_prints_its_one_summary_line_on_every_exit(tmp_path, moment, signum):
    result = subprocess.run([sys.executable, "-c", SIGNALLED_RUN, moment, str(int(signum)), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=60, preexec_fn=as_from_a_terminal)
    expected = 128 + signum if signum else 1
    (line,) = result.stdout.strip().splitlines()
    summary = json.loads(line)
    assert result.returncode == expected and summary["exit_code"] == expected, result.stderr
    assert "Traceback" not in result.stderr and summary["error"]
    if moment == "stage":
        assert summary["stages"][-1]["status"] == "interrupted"


def test_sigterm_during_a_real_stage_leaves_the_summary_line_and_the_staging_to_resume(tmp_path):
    silent = socket.socket()  # an LLM server that never answers: generate-text waits on it
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nclip = "ViT-B-32:random"\n[generate_text]\n'
                      f'labels = "{tmp_path / "labels.txt"}"\nbackend = "openai"\nmodel = "m"\n'
                      f'base_url = "http://127.0.0.1:{silent.getsockname()[1]}/v1"\n')
    started = subprocess.Popen([*OVML, "run", "--config", str(config), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # imports take a while on a loaded machine
        while not (tmp_path / "run" / ".staging" / "generate_text").exists() and time.monotonic() < deadline:
            assert started.poll() is None, started.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        started.send_signal(signal.SIGTERM)
        stdout, stderr = started.communicate(timeout=300)
    finally:
        started.kill()
        silent.close()
    (line,) = stdout.strip().splitlines()
    summary = json.loads(line)
    assert started.returncode == 143 and summary["exit_code"] == 143 and "Traceback" not in stderr
    assert summary["stages"] == [{"stage": "generate-text", "status": "interrupted", "seconds": ANY,
                                  "reason": "stopped by SIGTERM; run again to resume"}]
    assert (tmp_path / "run" / ".staging" / "generate_text").is_dir()
