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
import time

import keras
import numpy as np
import tensorflow as tf

from pipeline.reader import data as folder
from pipeline.reader import input as data_input
from training import checkpoints, checks, devices, evaluation, recipe, step, stopping, summaries
from training.feed import make_feed
from training.position import METRICS, PASSES, SUMS


def train(config, flags_text=None, before_step=None):
    """Trains (or continues training) with the paper's recipe; returns the final evaluation (eval.json).

    flags_text, the command's flags, goes to model_dir/flags.txt once the checks have passed. before_step(n), when
    given, is called before step n (counted from 1) is taken: the seam for whatever watches or stops a run."""
    run, position = start(config, flags_text)  # Every check before step 1; where the run continues from.
    try:
        if position.epoch >= config.epochs and (saved := saved_evaluation(run, position)):
            return saved
        with stopping.Preemption() as preemption:
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
        raise stopping.PeerLost(e.message) from None
    finally:
        run.claim.release()


def train_epoch(run, position, preemption, before_step=None):
    """The rest of epoch position.epoch, each step followed by the actions due after it; returns where the run is
    at the epoch's last step. Saves and stops the run (Preempted) when some worker was told to stop."""
    config = run.config
    steps = run.feed.steps(position.epoch)
    batches = stopping.Fetcher(run.feed.batches(position.epoch, skip_steps=position.epoch_step))
    # One worker alone can save while it waits for input; several must agree on the step (the request rides in
    # the steps' metrics), so theirs stands until it can.
    alone = run.feed.pipelines == 1
    results = Results()
    try:
        while position.epoch_step < steps:
            preemption.alive()
            if results.stop_requested():  # Every worker agrees on this step: see Preemption.
                raise stopping.StopRequested()
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
    except stopping.StopRequested:
        position = results.settle(position)[0]
        preemption.saving = True
        run.checkpoints.save(position)
        run.writers.flush()
        raise stopping.Preempted(position.step, preemption.signal) from None
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
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError, StopIteration) as e:
        # A corrupt record fails the input of the replica that reads it (DataLossError), an image that does not
        # decode its decoder (InvalidArgumentError); an input that ends before the planned steps (StopIteration,
        # or OutOfRangeError for one replica's) holds fewer records than summary.json lists.
        if isinstance(e, tf.errors.InvalidArgumentError) and "JPEG" not in e.message:
            raise
        where = f"at step {position.step + 1} (epoch {position.epoch + 1})"
        likely = run.feed.shards_at(position.epoch, position.epoch_step)
        error = e if isinstance(e, tf.errors.OpError) else None  # StopIteration quotes no TensorFlow error.
        files, size = run.data.files["train"], run.config.image_size
        raise checks.data_error(files, "training", error, where, likely, image_size=size) from None


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
        raise stopping.Preempted(position.step, preemption.signal) from None
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
    """A finished run's eval.json; None when it has none (killed before writing it) or one that does not read
    (then saying so): the final evaluation is done again, it changes nothing."""
    path = _eval_path(run.config)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            result = json.load(f)
        keys = {"images", "crops", "top1_error", "top5_error", "weights_sha256"}
        if not isinstance(result, dict) or not keys <= result.keys():
            raise ValueError(f"it holds no final evaluation's {', '.join(sorted(keys))}")
    except (ValueError, tf.errors.OpError) as e:  # ValueError: not JSON, not UTF-8, not an evaluation.
        print(f"{path} cannot be read ({type(e).__name__}: {e}): evaluating the final weights again", flush=True)
        return None
    print(
        f"{run.config.model_dir} has finished training ({run.config.epochs} epochs, {position.step} steps): "
        "nothing to do"
    )
    return result


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
    feed = make_feed(config, strategy, data)
    position = saved.restore(first_epoch_steps=feed.steps(0))
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
