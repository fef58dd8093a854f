"""One run per folder: the chief of a run claims its model_dir, and a second independent run there is refused.

Two runs writing one folder would delete each other's checkpoints (each keeps its last few) and truncate each
other's TensorBoard points. The claim is a small file, renewed by a thread while the run lives and removed when it
ends; a claim that its owner can no longer renew is taken over: at once when it names a process of this machine
that is gone (the same command after a kill -9), after STALE_SECONDS without renewal when it names another
machine (a job manager that restarts a lost worker elsewhere). Workers other than the chief share the folder
under the chief's claim."""

import contextlib
import json
import os
import socket
import threading
import time

import tensorflow as tf

NAME = ".claim.json"
RENEW_SECONDS = 15.0
STALE_SECONDS = 60.0


class Claimed(ValueError):
    """model_dir belongs to a live run; the message names it."""


def _process_start(pid):
    """The start time of process pid on this machine (ticks since boot), or None when there is none: a pid that
    a restarted container reuses has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _read(path):
    try:
        with tf.io.gfile.GFile(path) as f:
            claim = json.load(f)
        return claim if isinstance(claim, dict) and {"host", "pid", "since", "renewed"} <= set(claim) else None
    except (tf.errors.OpError, ValueError, UnicodeDecodeError):
        return None  # Half written by a process killed mid-write, or not ours: nobody's claim.


class Claim:
    """This process's claim on model_dir, taken by take() and given up by release()."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, NAME)
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
        self.mine["since"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self._stop, self._renewing = threading.Event(), None

    def take(self):
        """Claims the folder, waiting for another machine's claim to go stale; raises Claimed if it is live."""
        waited = False
        while (other := _read(self.path)) and not self._is_mine(other) and self._is_live(other):
            if other["host"] == self.mine["host"] or waited:
                age = time.time() - other["renewed"]
                raise Claimed(
                    f"--model_dir={os.path.dirname(self.path)} is in use by a run on {other['host']} (process "
                    f"{other['pid']}, since {other['since']}; renewed {age:.0f} s ago): stop it, wait for it to end, "
                    f"or give another --model_dir. (A run whose claim is not renewed for {STALE_SECONDS:.0f} s is "
                    "taken over)"
                )
            print(
                f"{self.path}: claimed by {other['host']}; waiting up to {STALE_SECONDS:.0f} s for it to go stale",
                flush=True,
            )
            time.sleep(STALE_SECONDS - (time.time() - other["renewed"]) + 1)
            waited = True
        tf.io.gfile.makedirs(os.path.dirname(self.path))
        self._write()
        self._renewing = threading.Thread(target=self._renew, daemon=True)
        self._renewing.start()

    def _is_mine(self, claim):
        return all(claim.get(k) == self.mine[k] for k in ("host", "pid", "start"))

    def _is_live(self, claim):
        if claim["host"] == self.mine["host"]:  # This machine can tell whether the process is still there.
            if claim.get("start") is not None:
                return _process_start(claim["pid"]) == claim["start"]
            try:  # No /proc (macOS): whether the pid is there at all.
                os.kill(claim["pid"], 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:  # Another user's process.
                return True
        return time.time() - claim["renewed"] < STALE_SECONDS

    def _write(self):
        with tf.io.gfile.GFile(self.path + ".tmp", "w") as f:
            f.write(json.dumps({**self.mine, "renewed": time.time()}))
        tf.io.gfile.rename(self.path + ".tmp", self.path, overwrite=True)

    def _renew(self):
        while not self._stop.wait(RENEW_SECONDS):
            with contextlib.suppress(tf.errors.OpError):  # A full disk, a lost bucket: the run's writes say so.
                self._write()

    def release(self):
        self._stop.set()
        if self._renewing:
            self._renewing.join()  # No renewal after the claim is gone.
        if (claim := _read(self.path)) and self._is_mine(claim):
            tf.io.gfile.remove(self.path)


class NoClaim:
    """What a worker other than the chief holds: nothing to take or give up."""

    def take(self):
        pass

    def release(self):
        pass
