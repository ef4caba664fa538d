"""Run directory: manifest records, the up-to-date rule, resume vs clean re-run, the lock, atomic writes."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from ovml.pipeline import atomic
from ovml.pipeline.errors import RunDirLocked
from ovml.pipeline.rundir import RunDir, lock_run_dir, run_stage


def make_stage(rd: RunDir, calls: list, value: str = "x"):
    def body(resume: bool) -> dict:
        calls.append(resume)
        atomic.write_text(rd / "out/result.txt", value)
        return {"value": value}
    return body


def run_once(rd, calls, params=None, force=False, inputs=()):
    return run_stage(rd, "demo", params=params or {"noise": 0.04}, inputs=list(inputs), outputs=["out"],
                     body=make_stage(rd, calls, str(params)), force=force)


def test_first_run_records_params_outputs_and_versions(tmp_path):
    rd = RunDir(tmp_path)
    outcome = run_once(rd, [])
    record = rd.stage_record("demo")
    assert outcome.status == "ran" and outcome.reason == "never ran"
    assert record["status"] == "finished" and record["params"] == {"noise": 0.04}
    assert record["outputs"] == {"out/result.txt": atomic.sha256_file(tmp_path / "out/result.txt")}
    assert {"ovml", "torch", "open_clip_torch", "python"} <= set(record["versions"])


def test_unchanged_stage_is_skipped(tmp_path):
    rd, calls = RunDir(tmp_path), []
    run_once(rd, calls)
    outcome = run_once(rd, calls)
    assert outcome.status == "skipped" and calls == [False]


def test_changed_param_reruns_and_says_which(tmp_path):
    rd, calls = RunDir(tmp_path), []
    run_once(rd, calls)
    outcome = run_once(rd, calls, params={"noise": 0.1})
    assert outcome.status == "ran" and "noise 0.04 -> 0.1" in outcome.reason


def test_changed_input_file_reruns(tmp_path):
    rd, calls = RunDir(tmp_path), []
    source = tmp_path / "in.txt"
    source.write_text("a")
    run_once(rd, calls, inputs=[source])
    source.write_text("b")
    assert run_once(rd, calls, inputs=[source]).reason == "inputs changed: in.txt"


def test_modified_output_reruns(tmp_path):
    rd, calls = RunDir(tmp_path), []
    run_once(rd, calls)
    (tmp_path / "out/result.txt").write_text("tampered")
    assert run_once(rd, calls).reason == "output missing or modified: out/result.txt"


def test_force_reruns(tmp_path):
    rd, calls = RunDir(tmp_path), []
    run_once(rd, calls)
    assert run_once(rd, calls, force=True).status == "ran"


def interrupt_then_rerun(rd: RunDir, params_on_rerun: dict) -> tuple[bool, bool]:
    """Kill a stage after it wrote one shard, re-run it; what the re-run saw: (resume, shard still there)."""
    def dies(resume):
        atomic.write_text(rd / "out/part-0.txt", "done")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(rd, "demo", params={"p": 1}, inputs=[], outputs=["out"], body=dies)
    seen = []
    run_stage(rd, "demo", params=params_on_rerun, inputs=[], outputs=["out"],
              body=lambda resume: seen.append((resume, (rd / "out/part-0.txt").exists())) or {})
    return seen[0]


def test_interrupted_attempt_with_same_params_resumes_and_keeps_its_outputs(tmp_path):
    assert interrupt_then_rerun(RunDir(tmp_path), {"p": 1}) == (True, True)


def test_interrupted_attempt_with_other_params_starts_clean(tmp_path):
    assert interrupt_then_rerun(RunDir(tmp_path), {"p": 2}) == (False, False)


def test_lock_is_reentrant_in_one_process(tmp_path):
    with lock_run_dir(tmp_path, "outer"), lock_run_dir(tmp_path, "inner"):
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()}")


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from ovml.pipeline.rundir import lock_run_dir
        with lock_run_dir({str(tmp_path)!r}, "ovml run"):
            print("locked", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"locked by pid {holder.pid} .*ovml run") as info:
            with lock_run_dir(tmp_path, "test"):
                pass
        assert info.value.exit_code == 75
    finally:
        holder.kill()
        holder.wait()


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "table.parquet"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_parquet_and_json_round_trip(tmp_path):
    atomic.write_parquet(tmp_path / "t.parquet", pa.table({"a": [1, 2]}))
    atomic.write_json(tmp_path / "m.json", {"k": [1]})
    assert pa.parquet.read_table(tmp_path / "t.parquet").column("a").to_pylist() == [1, 2]
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": [1]}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomically_written_artifacts_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
