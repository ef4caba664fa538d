"""`ovml run` from cron: one lock per run dir, kill -9 at any point and re-run, re-run only what changed.

These run the real SmolLM2 once (to write the captions), then the tiny random-weight CLIP for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

LABELS = {"cat": (200, 60, 60), "dog": (60, 200, 60), "car": (60, 60, 200), "tree": (200, 200, 60)}
OVML = [sys.executable, "-m", "ovml.cli"]


def write_config(workdir: Path, tiny_clip: str, noise: float = 0.04, epochs: int = 30) -> Path:
    config = workdir / "ovml.toml"
    config.write_text(f"""
run_dir = "{workdir / 'run'}"
clip = "{tiny_clip}"
seed = 0

[generate_text]
labels = "{workdir.parent / 'labels.txt'}"
per_label = 2
max_labels = 2

[train_adapter]
noise = {noise}
epochs = {epochs}
hidden = 64
patience = {epochs}

[embed_images]
dataset = "folder"
root = "{workdir.parent / 'images' / 'images.csv'}"
workers = 0

[eval]
""")
    return config


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_clip) -> Path:
    """Label file, a folder dataset, and a run dir whose captions the real LLM wrote (once per module)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    images = root / "images"
    images.mkdir()
    rows = ["path,labels"]
    for i, (a, b) in enumerate([("cat", "dog"), ("car", "tree"), ("cat", "tree"), ("dog", "car")] * 2):
        img = Image.new("RGB", (32, 32), LABELS[a])
        img.paste(Image.new("RGB", (16, 32), LABELS[b]), (16, 0))
        img.save(images / f"{i}.jpg")
        rows.append(f"{i}.jpg,{a}|{b}")
    (images / "images.csv").write_text("\n".join(rows) + "\n")
    seed_dir = root / "seed"
    seed_dir.mkdir()
    config = write_config(seed_dir, tiny_clip)
    result = subprocess.run([*OVML, "generate-text", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return root


def workdir_with_captions(shared: Path, name: str, tiny_clip: str, **config) -> tuple[Path, Path]:
    """A fresh run dir that already holds the module's captions (so generate-text is up to date)."""
    workdir = shared / name
    shutil.copytree(shared / "seed", workdir)
    return workdir, write_config(workdir, tiny_clip, **config)


def ovml_run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OVML, "run", "--config", str(config), "--json", *extra],
                          capture_output=True, text=True, timeout=600)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_until_running(workdir: Path, stage: str, process: subprocess.Popen) -> None:
    """Poll until `stage` has started building its outputs in .staging/ (the window a kill must land in)."""
    attempt = workdir / "run" / ".staging" / stage / "attempt.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if attempt.exists():
            return
        time.sleep(0.005)
    raise AssertionError(f"{stage} was never seen running")


def artifact_hashes(run_dir: Path) -> dict[str, str]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    outputs = {}
    for stage in ("embed_text", "train_adapter", "embed_images/folder"):
        outputs.update(manifest["stages"][stage]["outputs"])
    outputs.pop("adapter/train_log.parquet")  # has wall-clock seconds per epoch, so it differs run to run
    return outputs


def test_second_run_on_the_same_run_dir_exits_75_naming_the_holder(shared, tiny_clip):
    workdir, config = workdir_with_captions(shared, "locked", tiny_clip, epochs=5000)
    first = subprocess.Popen([*OVML, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until_running(workdir, "train_adapter", first)
        second = ovml_run(config)
        assert second.returncode == 75
        assert f"locked by pid {first.pid}" in second.stderr and second.stderr.strip().count("\n") == 0
    finally:
        first.kill()
        first.wait()


def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    config = tmp_path / "ovml.toml"
    config.write_text(f'run_dir = "{tmp_path / "runs" / "nested" / "run"}"\n\n[generate_text]\n'
                      f'labels = "{tmp_path / "missing.txt"}"\n')
    result = ovml_run(config)
    assert result.returncode == 2 and "missing.txt does not exist" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_eval_of_images_nothing_embeds_is_refused_before_any_stage(tmp_path, tiny_clip):
    config = tmp_path / "ovml.toml"
    (tmp_path / "labels.txt").write_text("dog\ncat\n")
    config.write_text(f'run_dir = "{tmp_path / "run"}"\nclip = "{tiny_clip}"\n\n'
                      f'[generate_text]\nlabels = "{tmp_path / "labels.txt"}"\n\n[eval]\ndataset = "folder"\n')
    result = ovml_run(config)
    assert result.returncode == 2 and "add an [embed_images] section" in result.stderr
    assert [s["status"] for s in summary_of(result)["stages"]] == ["failed"]  # eval's check; nothing ran
    assert not (tmp_path / "run").exists()


def test_run_then_rerun_skips_every_stage_and_reports_metrics(shared, tiny_clip):
    workdir, config = workdir_with_captions(shared, "rerun", tiny_clip)
    first = ovml_run(config)
    assert first.returncode == 0, first.stderr
    assert [s["status"] for s in summary_of(first)["stages"]] == ["skipped", "ran", "ran", "ran", "ran"]
    second = summary_of(ovml_run(config))
    assert [s["status"] for s in second["stages"]] == ["skipped"] * 5
    assert second["exit_code"] == 0 and second["metrics"]
    assert len(list((workdir / "run" / "logs").glob("*.log"))) == 2


def test_changing_only_the_noise_reruns_only_train_adapter_and_eval(shared, tiny_clip):
    workdir, config = workdir_with_captions(shared, "noise", tiny_clip)
    assert ovml_run(config).returncode == 0
    write_config(workdir, tiny_clip, noise=0.1)
    stages = {s["stage"]: s for s in summary_of(ovml_run(config))["stages"]}
    assert {name for name, s in stages.items() if s["status"] == "ran"} == {"train-adapter", "eval"}
    assert "noise 0.04 -> 0.1" in stages["train-adapter"]["reason"]


@pytest.mark.parametrize("stage", ["embed_text", "train_adapter"])
def test_kill_9_during_a_stage_then_rerun_gives_the_uninterrupted_artifacts(shared, tiny_clip, stage):
    reference, ref_config = workdir_with_captions(shared, f"ref-{stage}", tiny_clip, epochs=300)
    assert ovml_run(ref_config).returncode == 0

    workdir, config = workdir_with_captions(shared, f"killed-{stage}", tiny_clip, epochs=300)
    victim = subprocess.Popen([*OVML, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_until_running(workdir, stage, victim)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, f"the run finished before {stage} could be killed"

    resumed = ovml_run(config)
    assert resumed.returncode == 0, resumed.stderr
    assert artifact_hashes(workdir / "run") == artifact_hashes(reference / "run")
