"""One run per folder (training/claim.py): a live run's folder is refused to a second one, a dead run's claim is
taken over at once on its machine and after STALE_SECONDS from another, and a run gives its claim up at the end."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import tiny_run_config
from training import checks, claim, loop


def _claim_file(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / claim.NAME).write_text(json.dumps({"since": "then", "renewed": time.time(), **fields}))


@pytest.fixture
def other_process():
    """A live process of this machine that is not this one."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_folder_a_live_run_holds_is_refused_naming_the_run_before_anything_is_written(
    demo_data, tmp_path, other_process
):
    folder = tmp_path / "run"
    start = claim._process_start(other_process.pid)
    _claim_file(folder, host=socket.gethostname(), pid=other_process.pid, start=start, since="2026-12-01 10:00")
    config = tiny_run_config(demo_data, folder)
    with pytest.raises(checks.ConfigError) as error:
        loop.train(config)
    message = str(error.value)
    assert (
        f"is in use by a run on {socket.gethostname()} (process {other_process.pid}, since 2026-12-01 10:00" in message
    )
    assert "stop it, wait for it to end, or give another --model_dir" in message
    assert sorted(os.listdir(folder)) == [claim.NAME]  # Nothing of this run written.


def test_the_claim_of_a_process_that_is_gone_is_taken_over_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _claim_file(tmp_path, host=socket.gethostname(), pid=int(gone.stdout), start=12345)
    reused = os.getpid()  # A pid that lives again (a restarted container), with another start time.
    for pid in (int(gone.stdout), reused):
        _claim_file(tmp_path, host=socket.gethostname(), pid=pid, start=12345)
        taken = claim.Claim(str(tmp_path))
        taken.take()
        assert json.loads((tmp_path / claim.NAME).read_text())["pid"] == os.getpid()
        taken.release()
        assert not (tmp_path / claim.NAME).exists()


def test_another_machines_claim_is_waited_for_until_stale_then_taken_over_or_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(claim, "STALE_SECONDS", 2.0)
    _claim_file(tmp_path, host="elsewhere", pid=1, renewed=time.time() - 1)  # Its last renewal: a second ago.
    taken = claim.Claim(str(tmp_path))
    began = time.monotonic()
    taken.take()
    assert 1 <= time.monotonic() - began < 5 and "claimed by elsewhere; waiting up to 2 s" in capsys.readouterr().out
    taken.release()
    monkeypatch.setattr(claim, "RENEW_SECONDS", 0.2)
    live = claim.Claim(str(tmp_path))
    live.mine["host"] = "elsewhere"  # A run on another machine, renewing its claim meanwhile.
    live.take()
    try:
        with pytest.raises(claim.Claimed, match=r"in use by a run on elsewhere \(process \d+, since .*; renewed 0 s"):
            claim.Claim(str(tmp_path)).take()
    finally:
        live.release()


def test_a_finished_run_gives_its_claim_up(trained_run):
    config, _ = trained_run
    assert not os.path.exists(os.path.join(config.model_dir, claim.NAME))
