"""Run directory: manifest records, the up-to-date rule, staged outputs swapped in whole, resume vs clean re-run,
input verification, the lock, atomic writes."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from ovml.pipeline import atomic, rundir
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


def committed_then_killed_mid_commit(tmp_path: Path) -> RunDir:
    """A run dir whose stage ran once with v=1, then was killed with v=2 after its files were swapped in but
    before the manifest recorded them."""
    rd = RunDir(tmp_path)
    run_once(rd, [], params={"v": 1})
    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunDir, "_put_record", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_once(rd, [], params={"v": 2})
    return rd


def test_a_commit_killed_before_the_manifest_is_written_is_finished_by_the_next_run(tmp_path):
    rd = committed_then_killed_mid_commit(tmp_path)
    calls = []
    outcome = run_once(rd, calls, params={"v": 2})
    assert (outcome.status, outcome.reason) == ("ran", "completed the interrupted commit of an earlier run")
    assert calls == [] and run_once(rd, calls, params={"v": 2}).status == "skipped"
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


def dies_after_one_part(out, resume):
    atomic.write_text(out / "out/part-0.txt", "made from nothing")
    raise KeyboardInterrupt


@pytest.mark.parametrize("attempt, forced, plain, status, seen", [
    ("pool", {"p": 1}, {"p": 1}, "skipped", []),  # a stage-keyed forced attempt: dropped by a run that skips
    ("pool", {"p": 1}, {"p": 2}, "ran", [(False, False)]),  # and never taken up by a run that must run
    (None, {"p": 2}, {"p": 2}, "ran", [(True, True)]),  # keyed by the fingerprint: the same work, resumed
])
def test_what_a_killed_forced_attempt_staged_is_never_taken_up_by_a_plain_run(tmp_path, attempt, forced, plain,
                                                                              status, seen):
    rd, calls = RunDir(tmp_path), []
    run_stage(rd, "demo", params={"p": 1}, inputs=[], outputs=["out"], attempt=attempt,
              body=lambda out, resume: atomic.write_text(out / "out/part-0.txt", "the pool") or {})
    with pytest.raises(KeyboardInterrupt):
        run_stage(rd, "demo", params=forced, inputs=[], outputs=["out"], attempt=attempt, force=True,
                  body=dies_after_one_part)
    outcome = run_stage(rd, "demo", params=plain, inputs=[], outputs=["out"], attempt=attempt,
                        body=lambda out, resume: calls.append((resume, (out / "out/part-0.txt").exists())) or {})
    assert outcome.status == status and calls == seen
    assert not (tmp_path / ".staging" / "demo").exists()


def test_paths_into_the_staging_folder_are_reported_where_the_outputs_end_up(tmp_path):
    rd = RunDir(tmp_path)
    outcome = run_stage(rd, "demo", params={}, inputs=[], outputs=["out"],
                        body=lambda out, resume: atomic.write_text(out / "out/r.md", "x") or {
                            "report": str(out / "out/r.md"), "files": [str(out / "out")], "other": "/elsewhere"})
    expected = {"report": str(tmp_path / "out/r.md"), "files": [str(tmp_path / "out")], "other": "/elsewhere"}
    assert outcome.summary == expected and rd.stage_record("demo")["summary"] == expected
    assert (tmp_path / "out/r.md").is_file()


PAUSED_COMMIT = """
import sys
from pathlib import Path
from ovml.pipeline import atomic
from ovml.pipeline.rundir import RunDir, run_stage

real_put = RunDir._put_record

def put_after_a_pause(self, stage, record):
    print("swapped", flush=True)  # the new outputs are in place, the manifest still describes the old ones
    sys.stdin.readline()
    real_put(self, stage, record)

RunDir._put_record = put_after_a_pause
run_stage(RunDir(Path(sys.argv[1])), "demo", params={"v": 2}, inputs=[], outputs=["out"],
          body=lambda out, resume: atomic.write_text(out / "out/result.txt", "new") or {})
"""


def test_a_reader_that_meets_a_commit_between_its_swap_and_its_manifest_sees_the_new_outputs(tmp_path):
    rd = RunDir(tmp_path)
    run_once(rd, [], params={"v": 1})
    writer = subprocess.Popen([sys.executable, "-c", PAUSED_COMMIT, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "swapped"
        threading.Timer(0.3, lambda: (writer.stdin.write("go\n"), writer.stdin.flush())).start()
        hashes = rd.verified_hashes([tmp_path / "out/result.txt"])
    finally:
        assert writer.wait(30) == 0
    assert hashes == {"out/result.txt": atomic.sha256_file(tmp_path / "out/result.txt")}
    assert (tmp_path / "out/result.txt").read_text() == "new"


def test_a_load_that_a_commit_overtook_is_done_again_on_the_files_verified(tmp_path):
    rd = RunDir(tmp_path)
    run_once(rd, [], params={"v": 1})
    loads = []

    def load():
        if not loads:  # a whole commit lands between the verification and the load
            run_once(rd, [], params={"v": 2})
        loads.append((tmp_path / "out/result.txt").read_text())
        return loads[-1]

    loaded, hashes = rd.verified_load([tmp_path / "out/result.txt"], load)
    assert loaded == "{'v': 2}" and len(loads) == 2
    assert hashes == {"out/result.txt": rd.stage_record("demo")["outputs"]["out/result.txt"]}


def test_a_commit_killed_half_way_is_named_to_a_reader_with_the_command_that_completes_it(tmp_path, monkeypatch):
    rd = committed_then_killed_mid_commit(tmp_path)
    monkeypatch.setattr(rundir, "COMMIT_WAIT", 0.2)
    with pytest.raises(OvmlError, match=r"out/result.txt comes from a commit of `ovml demo --run-dir .*` that was "
                                        r"interrupted; run that command again to complete it"):
        rd.verified_hashes([tmp_path / "out/result.txt"])
