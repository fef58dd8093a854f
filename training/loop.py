"""The training loop: the §5 recipe under any tf.distribute strategy, resumable at any step.

`train(config)` is the whole run and reads top to bottom: epochs of steps, each followed by the actions that fall
due (the log line, a checkpoint, a preemption's save), the epoch's end (validation, schedule, best weights), the
final evaluation. Where the run is lives in one record, a Position (training/position.py), which each part takes
and returns and a checkpoint holds as it is; what the run computes with and writes to is a Run, built once. The
loop is written out (strategy.run inside a tf.function) rather than left to Keras' fit, which restarts an
interrupted epoch from its first step, keeps no schedule state across a restart and has an open failure under
MultiWorkerMirroredStrategy (keras-team/keras#20585). One loop serves the mirrored replicas, the towers on two
devices (§3.2), several workers, and either form of input (training/feed.py).

Exact resume: a run killed at any moment and started again with the same command continues from its last
checkpoint with the weights, momentum, schedule, data position and random draws it would have had: the data
order is a function of (seed, epoch) (pipeline/reader/input.py), and a step's random draws a function of (seed, step,
replica).
"""

import collections
import dataclasses
import functools
import hashlib
import json
import os
import queue
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from pipeline.reader import data as folder
from pipeline.reader import input as data_input
from training import checkpoints, checks, devices, evaluation, recipe, step, summaries
from training.feed import make_feed
from training.position import METRICS, PASSES, SUMS

# Saved after SIGTERM: 128 + SIGTERM, as TensorFlow's PreemptionCheckpointHandler exits on GCE. Job managers
# restart it: Kubeflow's TFJob (restartPolicy: ExitCode) retries 128-255 and treats 1-127 as permanent, which is
# what a refusal (status 1) is; Vertex AI restarts any non-zero status.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# A worker whose step failed because another worker of the run stopped (killed, preempted, or refusing its data):
# not this worker's doing, so a status the managers retry (they restart the lost one too). 128 + SIGHUP, the
# convention for "the session this process belonged to went away".
PEER_LOST_EXIT_CODE = 128 + signal.SIGHUP


def train(config, flags_text=None, before_step=None):
    """Trains (or continues training) with the paper's recipe; returns the final evaluation (eval.json).

    flags_text, the command's flags, goes to model_dir/flags.txt once the checks have passed. before_step(n), when
    given, is called before step n (counted from 1) is taken: the seam for whatever watches or stops a run."""
    run, position = start(config, flags_text)  # Every check before step 1; where the run continues from.
    try:
        if position.epoch >= config.epochs and tf.io.gfile.exists(_eval_path(config)):
            return saved_evaluation(run, position)
        with Preemption() as preemption:
            while position.epoch < config.epochs:
                began = time.monotonic()
                position = train_epoch(run, position, preemption, before_step)
                position = end_epoch(run, position, time.monotonic() - began, preemption)
        return final_evaluation(run, position)
    except (tf.errors.ResourceExhaustedError, OSError) as e:
        if "No space left on device" not in str(e):
            raise
        raise checkpoints.StorageError(run.checkpoints.no_space(e)) from None
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as e:
        if not any(sign in e.message for sign in ("Collective ops is aborted", "tasks are unhealthy")):
            raise
        raise PeerLost(e.message) from None
    finally:
        run.claim.release()


def train_epoch(run, position, preemption, before_step=None):
    """The rest of epoch position.epoch, each step followed by the actions due after it; returns where the run is
    at the epoch's last step. Saves and stops the run (Preempted) when some worker was told to stop."""
    config = run.config
    steps = run.feed.steps(position.epoch)
    batches = Fetcher(run.feed.batches(position.epoch, skip_steps=position.epoch_step))
    # One worker alone can save while it waits for input; several must agree on the step (the request rides in
    # the steps' metrics), so theirs stands until it can.
    alone = run.feed.pipelines == 1
    results = Results()
    try:
        while position.epoch_step < steps:
            preemption.alive()
            if results.stop_requested():  # Every worker agrees on this step: see Preemption.
                raise StopRequested()
            if before_step:
                before_step(position.step + 1)
            with run.profiler.step(position.step + 1):
                results.add(take_step(run, batches, position, preemption, alone))
            position = position.after_steps(1)
            if position.step % config.log_every_steps == 0 or position.epoch_step == steps:
                position = log(run, position, results, steps)
            if position.epoch_step < steps and run.checkpoints.due(position.step):
                position = results.settle(position)[0]
                run.checkpoints.save(position)
    except StopRequested:
        position = results.settle(position)[0]
        preemption.saving = True
        run.checkpoints.save(position)
        run.writers.flush()
        raise Preempted(position.step, preemption.signal) from None
    finally:
        batches.close()
    return results.settle(position)[0]


def take_step(run, batches, position, preemption, alone=False):
    """The next step, at §5's rate for it; its metrics, still on the device. A corrupt or short shard stops the
    run, named. A stop request (SIGTERM, Ctrl-C) travels in the step's metrics to every worker; one that comes
    while this worker, training alone, waits for the batch raises StopRequested (nothing of the step has run)."""
    stop = tf.constant(preemption.requested, tf.float32)
    try:
        with run.feed.waiting():
            batch = batches.next(lambda: alone and preemption.requested)
        run.optimizer.learning_rate.assign(learning_rate(run.config, position))
        return run.train_step(batch, tf.constant(position.step, tf.int64), stop, epoch=position.epoch)
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as e:
        # A corrupt record fails the input of the replica that reads it (DataLossError), an image that does not
        # decode its decoder (InvalidArgumentError); with several devices another replica may see its input end
        # first (OutOfRangeError): the planned steps never run out otherwise.
        if isinstance(e, tf.errors.InvalidArgumentError) and "JPEG" not in e.message:
            raise
        where = f"at step {position.step + 1} (epoch {position.epoch + 1})"
        likely = run.feed.shards_at(position.epoch, position.epoch_step)
        files, size = run.data.files["train"], run.config.image_size
        raise checks.data_error(files, "training", e, where, likely, image_size=size) from None


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


def learning_rate(config, position):
    """§5's rate for the step after `position`."""
    return recipe.learning_rate(config, position.step, position.plateau.drops)


class Results:
    """The steps' metrics, still on the device: looked at one step late (the step before the last has finished
    by the time the last is launched, so no step waits on the host) and summed into the Position when settled."""

    def __init__(self):
        self.recent, self.pending = collections.deque(maxlen=2), []

    def add(self, metrics):
        self.recent.append(metrics)
        self.pending.append(metrics)

    def _finished(self, name):
        """The step before the last one's metric `name`, or None."""
        return float(self.recent[0][name]) if len(self.recent) == 2 else None

    def stop_requested(self):
        return (self._finished("stop") or 0) > 0

    def settle(self, position):
        """(position with the pending steps' sums, their means for the log). Raises when the loss stopped being a
        number."""
        metrics = [m.values().astype(np.float64) for m in self.pending]
        steps, self.pending = len(metrics), []
        total = np.sum(metrics, axis=0) if metrics else np.zeros(len(METRICS))
        sums, passes = total[: len(SUMS)], total[METRICS.index(PASSES[0]) :]
        checks.finite(
            sums, f"the loss is not a number at step {position.step}: lower --learning_rate (or add --warmup_steps)"
        )
        return position.with_sums(sums, passes), {**summaries.mean_metrics(sums), "steps": steps}


def log(run, position, results, epoch_steps):
    """The console's progress line and the train/ scalars, from the steps since the last settle."""
    position, means = results.settle(position)
    rates = run.progress.step(position, epoch_steps, means)
    lr = recipe.learning_rate(run.config, position.step - 1, position.plateau.drops)  # The last step's.
    run.writers.scalars("train", position.step, {**means, **rates, "learning_rate": lr})
    return position


def end_epoch(run, position, seconds, preemption=None):
    """§5's check after each epoch: the validation error, the schedule, the best weights, a checkpoint. A stop
    request during the validation saves the epoch's steps (a resumed run validates them again) and stops."""
    config, epoch = run.config, position.epoch
    train = summaries.mean_metrics(position.epoch_sums)
    try:
        validation = evaluate(run, crops=1, stop=preemption.alive if preemption else lambda: 0)
    except evaluation.Interrupted:
        preemption.saving = True
        run.checkpoints.save(position)
        run.writers.flush()
        raise Preempted(position.step, preemption.signal) from None
    plateau = position.plateau.update(validation["top1_error"], config.lr_patience, config.lr_drops)
    feed_scalars, feed_line = run.feed.epoch_report(position)
    if feed_line and run.chief:
        print(f"epoch {epoch + 1}: {feed_line}", flush=True)
    scalars = {f"epoch/{k}": v for k, v in train.items()} | {"epoch/epoch": epoch + 1} | feed_scalars
    run.writers.scalars("train", position.step, scalars)
    keys = ("loss", "top1_error", "top5_error")
    run.writers.scalars("validation", position.step, {f"epoch/{k}": validation[k] for k in keys})
    if run.chief:
        inputs, probe = run.samples()
        run.writers.epoch(position.step, run.model, inputs=inputs, probe=probe, seed=[config.seed, epoch])
    if plateau.drops > position.plateau.drops:
        lr = recipe.learning_rate(config, position.step, plateau.drops)
        print(f"validation top-1 error has not improved for {config.lr_patience} epochs: learning rate now {lr:g}")
    improved = plateau.best < position.plateau.best
    position = position.next_epoch(plateau)
    run.checkpoints.save(position, best=improved)
    run.writers.flush()
    run.progress.epoch(epoch, train, validation, learning_rate(config, position), seconds)
    return position


def evaluate(run, crops, stop=lambda: 0):
    config, data = run.config, run.data
    return evaluation.evaluate(
        run.model,
        run.strategy,
        data.files["validation"],
        data.sizes["validation"],
        batch_size=config.batch_size,
        image_size=config.image_size,
        crops=crops,
        labels=data.labels,
        stop=stop,
    )


def final_evaluation(run, position):
    """eval.json: the final weights on the whole validation split, on the centre crop or §4.1's ten patches."""
    config = run.config
    result = evaluate(run, crops=config.eval_crops)
    result["weights_sha256"] = weights_digest(run.model)
    errors = {f"{k}_{config.eval_crops}crop": result[k] for k in ("top1_error", "top5_error")}
    run.writers.scalars("eval", position.step, errors)
    run.writers.flush()
    if run.chief:
        checkpoints.write_file(_eval_path(config), json.dumps(result, indent=2))
    return result


def saved_evaluation(run, position):
    print(
        f"{run.config.model_dir} has finished training ({run.config.epochs} epochs, {position.step} steps): "
        "nothing to do"
    )
    with tf.io.gfile.GFile(_eval_path(run.config)) as f:
        return json.load(f)


def _eval_path(config):
    return os.path.join(config.model_dir, "eval.json")


def weights_digest(model):
    """SHA-256 of every weight of the model, in order: which weights an evaluation saw (and whether workers
    agree)."""
    digest = hashlib.sha256()
    for v in model.weights:
        digest.update(np.ascontiguousarray(v.numpy()).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run computes with and writes to, built once; where it is lives apart, in a Position."""

    config: recipe.Config
    strategy: tf.distribute.Strategy
    chief: bool  # Writes the run's outputs (under several workers, one does).
    data: folder.Data
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    feed: object  # training/feed.py: the training batches.
    train_step: object
    checkpoints: checkpoints.RunCheckpoints
    writers: summaries.Writers
    progress: summaries.Progress
    profiler: summaries.Profiler
    samples: object  # () -> the fixed images of the per-epoch summaries (summary_samples), read when first asked.
    claim: object  # training/claim.py: the chief's claim on model_dir, given up when the run ends.


def start(config, flags_text=None):
    """The run in config.model_dir: checked (everything that can be wrong is found here, before anything is built
    or written), then built and restored: (Run, the Position it continues from: step 0 for a new run)."""
    checks.check_config(config)
    checks.check_cluster(config)  # Before MultiWorkerMirroredStrategy reads TF_CONFIG.
    strategy = devices.make_strategy(config)  # What the checks of devices, batch and shared folder look at.
    data = checks.check_run(config, strategy)
    claim = checks.claim_model_dir(config.model_dir, devices.is_chief(strategy))  # The first write.
    try:
        run, position = build(config, strategy, data, claim)
        if run.chief:
            write_settings(config, data, flags_text)
            summaries.truncate_after(config.model_dir, position.step)  # Points of a killed run after it.
            if not position.step:  # A new run: its settings once, for comparing runs in TensorBoard.
                summaries.Writers.hparams(config.model_dir, config.to_json())
        announce(run, position)
    except BaseException:
        claim.release()
        raise
    return run, position


def build(config, strategy, data, claim):
    """The Run of these checked settings, and the Position its last checkpoint holds."""
    chief = devices.is_chief(strategy)
    keras.utils.set_random_seed(config.seed)  # The initial weights (§5) depend on the seed alone.
    with strategy.scope():
        model, optimizer = step.build_model(config, len(data.labels), data.stats)
    saved = checkpoints.RunCheckpoints(
        config, model=model, optimizer=optimizer, worker=None if chief else devices.worker_index(strategy)
    )
    position = saved.restore()
    feed = make_feed(config, strategy, data)
    total_steps = sum(feed.steps(epoch) for epoch in range(config.epochs))
    run = Run(
        config,
        strategy,
        chief,
        data,
        model,
        optimizer,
        feed,
        step.make_train_step(model, optimizer, strategy, config),
        saved,
        summaries.Writers(config.model_dir, enabled=chief),
        summaries.Progress(total_steps, config.epochs, config.batch_size, position.step, enabled=chief),
        summaries.Profiler(os.path.join(config.model_dir, "train"), config.profile_steps),
        functools.cache(lambda: summary_samples(config, data)),
        claim,
    )
    return run, position


def write_settings(config, data, flags_text):
    """config.json (what check_resume compares), labels.txt (the run names its own classes), flags.txt."""
    folder = config.model_dir
    tf.io.gfile.makedirs(folder)
    checkpoints.write_file(os.path.join(folder, "config.json"), json.dumps(config.to_json(), indent=2))
    checkpoints.write_file(os.path.join(folder, "labels.txt"), "".join(f"{w}\t{n}\n" for w, n in data.labels))
    if flags_text is not None:
        checkpoints.write_file(os.path.join(folder, "flags.txt"), flags_text)


def announce(run, position):
    """Where the run continues from, and what it runs on."""
    config, replicas = run.config, run.strategy.num_replicas_in_sync
    if position.epoch >= config.epochs:
        return
    if position.step:
        print(
            f"Resuming {config.model_dir} at step {position.step}: epoch {position.epoch + 1}, step "
            f"{position.epoch_step} of it",
            flush=True,
        )
    if run.chief:
        print(
            f"Training on {devices.describe(run.strategy, config)}: {replicas} replica(s) "
            f"({type(run.strategy).__name__}, {run.feed.pipelines} worker(s)): batch "
            f"{config.batch_size} = {replicas} x {config.batch_size // replicas}, {run.feed.steps(0)} steps an "
            f"epoch, {config.epochs} epochs",
            flush=True,
        )
        if run.feed.describe():
            print(run.feed.describe(), flush=True)


def summary_samples(config, data):
    """(8 training images to show augmented, a validation batch (images, labels) the gradient norms are taken
    on): the same every epoch."""
    size = dict(image_size=config.image_size)
    files, sizes = data.files, data.sizes
    inputs = data_input.train_dataset(files["train"], sizes["train"], seed=config.seed, epoch=0, batch_size=8, **size)
    probe = data_input.eval_dataset(files["validation"], sizes["validation"], batch_size=32, **size)
    return next(iter(inputs))[0], tuple(next(iter(probe))[:2])


def exit_code(signum):
    """128 + the signal, as a shell reports a process the signal ended: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + signum


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
