"""The run folder: checked before any work, locked while a run writes into it."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from bayesnoise.pipeline import runfolder


def test_prepare_creates_the_folder_and_refuses_a_file_on_the_way(tmp_path):
    out = runfolder.prepare(tmp_path / "a" / "b")
    assert out.is_dir()
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(runfolder.UsageError, match="is a file") as e:
        runfolder.prepare(file)
    assert e.value.exit_code == 2 and str(file) in str(e.value)
    with pytest.raises(runfolder.UsageError, match=f"under {file}, which is a file"):
        runfolder.prepare(file / "out")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_prepare_names_a_folder_that_cannot_be_created():
    with pytest.raises(runfolder.UsageError, match="cannot create the folder") as e:
        runfolder.prepare("/proc/self/no-such-run", name="--out")
    assert "--out '/proc/self/no-such-run'" in str(e.value)


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    with runfolder.lock(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(runfolder.LockedError, match=f"process {os.getpid()} on") as e:
            with runfolder.lock(tmp_path):
                pass
        assert e.value.exit_code == 1
    assert not path.exists()  # released: the next run takes it without a word
    with runfolder.lock(tmp_path):
        pass


HOLD = textwrap.dedent(
    """
    import sys, time
    from bayesnoise.pipeline import runfolder
    with runfolder.lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runfolder.LockedError, match=f"process {holder.pid} on"):
            with runfolder.lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays
        holder.wait()
    assert json.loads((tmp_path / runfolder.LOCK_NAME).read_text())["pid"] == holder.pid
    caplog.set_level(logging.WARNING, logger="bayesnoise")
    with runfolder.lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"locked by process {holder.pid}" in caplog.text
    assert "no longer runs: taking it over" in caplog.text


@pytest.mark.parametrize("blocker", ["results.json/", "checkpoints"])
def test_a_folder_or_file_in_the_way_of_the_run_is_found_before_any_work(tmp_path, blocker):
    if blocker.endswith("/"):
        (tmp_path / blocker).mkdir()
    else:
        (tmp_path / blocker).write_text("x")
    files = ("results.json", "checkpoints/train.msgpack")
    with pytest.raises(runfolder.UsageError, match="is in the way") as e:
        runfolder.prepare(tmp_path, files=files)
    assert str(tmp_path / blocker.rstrip("/")) in str(e.value)
