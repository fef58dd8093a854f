"""How a run stops when asked to: SIGTERM (what cloud VMs and Kubernetes send before they take a machine away) and
Ctrl-C, the save they lead to and the status the process ends with, and what a worker says when another worker
of its run stopped. The loop (training/loop.py) acts on these; job managers restart by the statuses."""

import os
import queue
import signal
import threading
import time


def exit_code(signum):
    """128 + the signal, as a shell reports a process the signal ended: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + signum


# Saved after SIGTERM: 128 + SIGTERM, as TensorFlow's PreemptionCheckpointHandler exits on GCE. Job managers
# restart it: Kubeflow's TFJob (restartPolicy: ExitCode) retries 128-255 and treats 1-127 as permanent, which is
# what a refusal (status 1) is; Vertex AI restarts any non-zero status.
PREEMPTED_EXIT_CODE = exit_code(signal.SIGTERM)
# A worker whose step failed because another worker of the run stopped (killed, preempted, or refusing its data):
# not this worker's doing, so a status the managers retry (they restart the lost one too). 128 + SIGHUP, the
# convention for "the session this process belonged to went away".
PEER_LOST_EXIT_CODE = exit_code(signal.SIGHUP)


class StopRequested(Exception):
    """A stop request the run can act on at this step: every worker's, or one that came while a worker training
    alone waited for its next batch."""


class Fetcher:
    """An epoch's batches, each fetched by a thread of its own while the main thread waits for it in slices: Python
    runs nothing on a main thread that TensorFlow blocks, and input that never comes (a tf.data service without
    live workers, a stalled bucket) would otherwise hold off a stop request for ever. Nothing of a step has run
    while its batch is awaited, so the run can save there."""

    WAIT_SLICE_SECONDS = 0.25

    def __init__(self, batches):
        self.batches, self.asked, self.got = batches, queue.Queue(), queue.Queue()
        threading.Thread(target=self._fetch, daemon=True).start()

    def _fetch(self):
        while self.asked.get():
            try:
                self.got.put((next(self.batches), None))
            except BaseException as e:  # Raised where the batch is awaited.
                self.got.put((None, e))

    def next(self, stop):
        """The next batch; StopRequested when stop() while it is awaited."""
        self.asked.put(True)
        while True:
            try:
                batch, error = self.got.get(timeout=self.WAIT_SLICE_SECONDS)
            except queue.Empty:
                if stop():
                    raise StopRequested() from None
                continue
            if error is not None:
                raise error
            return batch

    def close(self):
        self.asked.put(False)  # The thread ends after its fetch, if any (a daemon: it never holds the exit).


class Preempted(Exception):
    """The run saved a checkpoint and stopped because a worker was told to stop (SIGTERM, or Ctrl-C)."""

    def __init__(self, step, signum=signal.SIGTERM):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: saved step {step}; the same command continues from there")
        self.step, self.exit_code = step, exit_code(signum)


class PeerLost(Exception):
    """Another worker of the run stopped, and this one's step, which needs every worker, failed with it."""

    exit_code = PEER_LOST_EXIT_CODE

    def __init__(self, message):
        reason = " ".join(message.split("Collective ops is aborted by:", 1)[-1].split()).strip()
        super().__init__(
            f"a worker of this run stopped ({reason[:300]}): its own output says why. Started again with the same "
            "command, every worker continues from the last checkpoint (a job manager does this on its own)"
        )


class Preemption:
    """SIGTERM (what cloud VMs and Kubernetes send before they take a machine away) or Ctrl-C (SIGINT) asks the
    run to save and stop; a second Ctrl-C stops it at once, saving nothing more.

    The request rides in every step's summed metrics (and every validation batch's), so every worker of a
    MultiWorkerMirroredStrategy job learns of it at the same step and they all save at that step (a checkpoint
    needs them all). The loop reads the flag one step late, from a step whose result is already there, so no step
    waits on the host. TensorFlow's PreemptionCheckpointHandler agrees on the step through the coordination
    service instead, with threads that watch its key-value store, and saves its own checkpoint; this run's
    checkpoint also records where the run is.

    A signal is taken by a thread, from the pipe Python writes each signal's number to: Python runs a handler only
    when the main thread runs Python, never while TensorFlow blocks it. A step's batch is awaited in slices
    (Fetcher), so a request that comes while a worker training alone waits for input that does not come (a
    tf.data service without live workers, a stalled bucket) saves at once. Where that cannot be (several workers
    must save at one step, or a step never ends: a collective waiting for a lost peer), a run that takes no step
    or validation batch for GRACE_SECONDS after the request exits unsaved with the same status: its last
    checkpoint stands, and the machine's grace period (30 s on a GCE Spot VM, often less for a pod) is not spent
    waiting.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    GRACE_SECONDS = 10

    def __init__(self):
        self.requested, self.signal, self.saving = 0.0, signal.SIGTERM, False
        self._last_seen, self._previous, self._pipe = time.monotonic(), {}, None
        # Each signal reaches the handler (when the main thread runs Python) and the pipe; whichever sees the
        # n-th of a kind first acts on it.
        self._lock, self._by_handler, self._by_pipe, self._acted = threading.Lock(), {}, {}, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers.
            ignored = signal.SIGINT if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else None  # nohup, `&`.
            taken = [signum for signum in self.SIGNALS if signum != ignored]
            self._previous = {signum: signal.signal(signum, self._handler) for signum in taken}
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._pipe = (read, write, signal.set_wakeup_fd(write))
            threading.Thread(target=self._listen, args=(read,), daemon=True).start()
        return self

    def alive(self):
        """Called as the run goes on (each step, each validation batch); returns the request (1.0: stop)."""
        self._last_seen = time.monotonic()
        return self.requested

    def _handler(self, signum, frame):
        del frame
        if self._take(signum, self._by_handler) and self._act(signum):
            raise KeyboardInterrupt("Ctrl-C again: stopped at once")

    def _listen(self, read):
        while data := os.read(read, 64):
            for signum in (s for s in data if s in self.SIGNALS):
                with self._lock:
                    self._by_pipe[signum] = n = self._by_pipe.get(signum, 0) + 1
                deadline = time.monotonic() + 1  # The handler's chance, if the main thread runs Python.
                while self._by_handler.get(signum, 0) < n and time.monotonic() < deadline:
                    time.sleep(0.02)
                if self._take(signum, self._by_pipe, n) and self._act(signum):
                    print("Ctrl-C again: stopped at once", flush=True)
                    os._exit(exit_code(signum))
        os.close(read)

    def _take(self, signum, counts, n=None):
        """Whether this sighting of signal `signum` (the n-th through `counts`) is the first of that signal."""
        with self._lock:
            if n is None:
                counts[signum] = n = counts.get(signum, 0) + 1
            if self._acted.get(signum, 0) >= n:
                return False
            self._acted[signum] = n
            return True

    def _act(self, signum):
        """Notes a stop request; returns True for a second Ctrl-C, which stops the run at once."""
        if self.requested:
            return signum == signal.SIGINT
        name = signal.Signals(signum).name
        print(f"{name}: saving a checkpoint after the next step, then stopping (Ctrl-C again: at once)", flush=True)
        self.requested, self.signal, self._last_seen = 1.0, signum, time.monotonic()
        threading.Thread(target=self._watch, daemon=True).start()
        return False

    def _watch(self):
        while not self.saving and time.monotonic() - self._last_seen < self.GRACE_SECONDS:
            time.sleep(0.2)
        if not self.saving:
            name = signal.Signals(self.signal).name
            print(
                f"train.py: no step finished within {self.GRACE_SECONDS} s of {name} (a worker waiting for input, or "
                "for a lost one?): stopped without a new checkpoint; the same command continues from the last one",
                flush=True,
            )
            os._exit(exit_code(self.signal))

    def __exit__(self, *exc):
        self.saving = True  # The watch stands down: the run ends here, one way or another.
        if self._pipe:  # The final evaluation is not interrupted: a restart redoes it.
            read, write, previous_fd = self._pipe
            signal.set_wakeup_fd(previous_fd)
            os.close(write)  # The listening thread reads the end of the pipe and closes it.
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
