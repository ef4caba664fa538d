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
