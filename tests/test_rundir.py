"""Run directory: manifest records, the up-to-date rule, staged outputs swapped in whole, resume vs clean re-run,
input verification, the lock, atomic writes."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from ovml.pipeline import atomic
from ovml.pipeline.errors import OvmlError, RunDirLocked
from ovml.pipeline.rundir import RunDir, lock_run_dir, run_stage


def make_stage(rd: RunDir, calls: list, value: str = "x"):
    def body(out, resume: bool) -> dict:
        calls.append(resume)
        atomic.write_text(out / "out/result.txt", value)
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
    def dies(out, resume):
        atomic.write_text(out / "out/part-0.txt", "done")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(rd, "demo", params={"p": 1}, inputs=[], outputs=["out"], body=dies)
    seen = []
    run_stage(rd, "demo", params=params_on_rerun, inputs=[], outputs=["out"],
              body=lambda out, resume: seen.append((resume, (out / "out/part-0.txt").exists())) or {})
    return seen[0]


def test_interrupted_attempt_with_same_params_resumes_and_keeps_its_outputs(tmp_path):
    assert interrupt_then_rerun(RunDir(tmp_path), {"p": 1}) == (True, True)


def test_interrupted_attempt_with_other_params_starts_clean(tmp_path):
    assert interrupt_then_rerun(RunDir(tmp_path), {"p": 2}) == (False, False)


def test_while_the_body_runs_the_old_outputs_are_still_in_place(tmp_path):
    rd = RunDir(tmp_path)
    run_once(rd, [], params={"v": 1})
    seen = []
    run_stage(rd, "demo", params={"v": 2}, inputs=[], outputs=["out"],
              body=lambda out, resume: seen.append((tmp_path / "out/result.txt").read_text()) or {})
    assert seen == ["{'v': 1}"]


def test_a_failing_body_leaves_the_old_outputs_and_their_record(tmp_path):
    rd = RunDir(tmp_path)
    run_once(rd, [], params={"v": 1})
    record, digest = rd.stage_record("demo"), atomic.sha256_file(tmp_path / "out/result.txt")

    def fails(out, resume):
        atomic.write_text(out / "out/result.txt", "half")
        raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        run_stage(rd, "demo", params={"v": 2}, inputs=[], outputs=["out"], body=fails)
    assert atomic.sha256_file(tmp_path / "out/result.txt") == digest
    assert rd.stage_record("demo") == record


def test_new_outputs_replace_the_old_ones_whole(tmp_path):
    rd = RunDir(tmp_path)
    atomic.write_text(tmp_path / "out/stale.txt", "from an older run")
    run_once(rd, [], params={"v": 1})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result.txt"]
    assert not (tmp_path / ".staging" / "demo").exists()


def test_a_commit_killed_before_the_manifest_is_written_is_finished_by_the_next_run(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    run_once(rd, [], params={"v": 1})
    with monkeypatch.context() as m:
        m.setattr(RunDir, "_put_record", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_once(rd, [], params={"v": 2})
    calls = []
    assert run_once(rd, calls, params={"v": 2}).status == "skipped" and calls == []
    assert (tmp_path / "out/result.txt").read_text() == "{'v': 2}"
    assert rd.stage_record("demo")["params"] == {"v": 2}


def test_exchange_swaps_a_file_and_a_folder_in_one_step(tmp_path):
    (tmp_path / "a").write_text("file")
    (tmp_path / "b").mkdir()
    if not atomic.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem cannot exchange; run_stage falls back to two renames")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").read_text() == "file"


def test_an_input_that_differs_from_its_producers_record_stops_the_consumer(tmp_path):
    rd = RunDir(tmp_path)
    run_once(rd, [])
    (tmp_path / "out/result.txt").write_text("flipped bytes")
    with pytest.raises(OvmlError, match=r"out/result.txt is not the file `ovml demo` wrote .* "
                                        r"`ovml demo --force --run-dir"):
        run_stage(rd, "consumer", params={}, inputs=[tmp_path / "out/result.txt"], outputs=["c"],
                  body=lambda out, resume: {})


def test_a_damaged_manifest_is_a_one_line_error(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stages": {"demo": {"status": "fini')
    with pytest.raises(OvmlError, match="manifest.json is damaged"):
        RunDir(tmp_path).manifest()


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
