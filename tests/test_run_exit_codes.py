"""`ovml run` exit codes that cron relies on: 2 before any work for a bad config, 1 when a stage fails."""

import json
import subprocess
import sys

OVML = [sys.executable, "-m", "ovml.cli"]


def run(config) -> subprocess.CompletedProcess:
    return subprocess.run([*OVML, "run", "--config", str(config), "--json"], capture_output=True, text=True)


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
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ovml.pipeline.rundir import lock_run_dir\n"
                               f"with lock_run_dir(Path({str(tmp_path / 'run')!r}), 'test'):\n"
                               "    print('locked', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run(config)
    finally:
        holder.kill()
        holder.wait()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 75 and summary["exit_code"] == 75 and "locked" in summary["error"]


def test_failing_stage_exits_1_with_a_json_summary_and_a_log(tmp_path):
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n[generate_text]\nlabels = "{tmp_path / "missing.txt"}"\n')
    result = run(config)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 1 and summary["exit_code"] == 1
    assert summary["stages"] == [{"stage": "generate-text", "status": "failed", "seconds": 0.0,
                                  "reason": f"labels file {tmp_path / 'missing.txt'} does not exist; "
                                            "pass a text file with one label per line to --labels"}]
    (log,) = (tmp_path / "run" / "logs").glob("*.log")
    assert "generate-text: failed" in log.read_text()
