"""The training loop: the §5 recipe under any tf.distribute strategy, resumable at any step.

`train(config)` is the whole run, and its loop reads top to bottom: a step, the log line, the checkpoint, the
epoch's end (validation, schedule, best weights), the final evaluation. The loop is written out (strategy.run inside
a tf.function) rather than left to Keras' fit, which restarts an interrupted epoch from its first step, keeps no
schedule state across a restart and has an open failure under MultiWorkerMirroredStrategy (keras-team/keras#20585).
One loop serves the mirrored replicas, the towers on two devices (§3.2) and several workers.

Exact resume: a run killed at any moment and started again with the same command continues from its last
checkpoint with the weights, momentum, schedule, data position and random draws it would have had: the data
order is a function of (seed, epoch) (pipeline/input.py), and a step's random draws a function of (seed, step,
replica).
"""

import collections
import hashlib
import json
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from model import classifier, draws
from pipeline import input as data_input
from pipeline import service
from training import checkpoints, checks, devices, evaluation, recipe, summaries


def train(config, flags_text=None, before_step=None):
    """Trains (or continues training) with the paper's recipe; returns the final evaluation (eval.json).

    flags_text, the command's flags, goes to model_dir/flags.txt once the checks have passed. before_step(n), when
    given, is called before step n (counted from 1) is taken: the seam for whatever watches or stops a run."""
    run = start(config, flags_text)  # Every check before step 1; the checkpoint it continues from.
    if run.finished():
        return run.saved_evaluation()
    with Preemption() as preemption:
        for epoch in range(run.epoch, config.epochs):
            began, steps = time.monotonic(), run.steps_in_epoch(epoch)
            batches = iter(run.epoch_dataset(epoch, skip_steps=run.epoch_step))
            while run.epoch_step < steps:
                if run.preempted():  # Every worker agrees on this step: see Preemption.
                    run.save()
                    raise Preempted(run.step)
                if before_step:
                    before_step(run.step + 1)
                with run.profiler.step(run.step + 1):
                    metrics = run.take_step(batches, epoch, preemption.requested)
                if metrics is None:  # From a tf.data service, whose epoch ends when its workers run out.
                    break
                if run.step % config.log_every_steps == 0 or run.epoch_step == steps:
                    run.log(epoch, steps)
                if run.epoch_step < steps and run.checkpoint_due():
                    run.save()
            end_epoch(run, epoch, time.monotonic() - began)
    return final_evaluation(run)


PREEMPTED_EXIT_CODE = 42  # As TensorFlow's PreemptionCheckpointHandler exits: "saved; start me again".


class Preempted(Exception):
    """The run saved a checkpoint and stopped because a worker was told to stop (SIGTERM)."""

    def __init__(self, step):
        super().__init__(f"stopped by SIGTERM: saved step {step}; the same command continues from there")
        self.step = step


class Preemption:
    """SIGTERM (what cloud VMs and Kubernetes send before they take a machine away) asks the run to save and stop.

    The request rides in every step's summed metrics, so every worker of a MultiWorkerMirroredStrategy job learns
    of it at the same step and they all save at that step (a checkpoint needs them all). The loop reads the flag
    one step late, from a step whose result is already there, so no step waits on the host. TensorFlow's
    PreemptionCheckpointHandler agrees on the step through the coordination service instead, with threads that
    watch its key-value store, and saves its own checkpoint; this run's checkpoint also records where the run is.
    """

    def __init__(self):
        self.requested, self._previous = 0.0, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers.
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum, frame):
        del signum, frame
        if not self.requested:
            print("SIGTERM: saving a checkpoint after the next step, then stopping", flush=True)
        self.requested = 1.0

    def __exit__(self, *exc):
        if self._previous is not None:  # The final evaluation is not interrupted: a restart redoes it.
            signal.signal(signal.SIGTERM, self._previous)


class ServiceWatch:
    """Around a step fed by a tf.data service: when it waits for batches longer than service.STALL_SECONDS, the
    trainer looks for why (no workers, or workers this host cannot reach) and says so, naming the addresses."""

    def __init__(self, dispatcher):
        self.timer = threading.Timer(service.STALL_SECONDS, self._report, (dispatcher,)) if dispatcher else None

    @staticmethod
    def _report(dispatcher):
        problem = service.diagnose(dispatcher)
        if problem:
            print(f"Waiting for batches for {service.STALL_SECONDS} s: {problem}", flush=True)

    def __enter__(self):
        if self.timer:
            self.timer.daemon = True
            self.timer.start()

    def __exit__(self, *exc):
        if self.timer:
            self.timer.cancel()


class TrainState(tf.Module):
    """Where the run is, and §5's schedule: what a checkpoint holds besides the weights and momentum."""

    def __init__(self):
        super().__init__()
        int64 = dict(dtype=tf.int64, trainable=False)
        # Steps done; epochs done (trained, validated, schedule updated); steps done in the current epoch.
        self.step, self.epoch, self.epoch_step = (tf.Variable(0, **int64) for _ in range(3))
        self.best = tf.Variable(np.inf, dtype=tf.float64, trainable=False)
        self.wait, self.drops = tf.Variable(0, **int64), tf.Variable(0, **int64)
        self.epoch_sums = tf.Variable(np.zeros(4), dtype=tf.float64, trainable=False)  # loss, top-1, top-5, images

    @property
    def plateau(self):
        return recipe.Plateau(float(self.best.numpy()), int(self.wait.numpy()), int(self.drops.numpy()))


def build_model(config, data, tower_devices=True):
    """The classifier of config's settings for data's classes and statistics, and its optimizer, built (in the
    caller's strategy or device scope). tower_devices=False keeps the towers on the scope's one device."""
    model = classifier.build_classifier(
        len(data.labels),
        data.stats,
        image_size=config.image_size,
        crop_size=config.crop_size,
        lighting_std=config.lighting_std,
        precision=config.precision,
        tower_devices=(config.tower_devices or None) if tower_devices else None,
        dropout=config.dropout,
        weight_std=config.weight_std,
    )
    optimizer = make_optimizer(config)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def make_optimizer(config):
    """§5's update rule; under float16, wrapped in dynamic loss scaling (float16 gradients underflow without it)."""
    optimizer = recipe.PaperSGD(config.learning_rate, config.momentum, config.weight_decay)
    return keras.optimizers.LossScaleOptimizer(optimizer) if config.precision == "mixed_float16" else optimizer


def replica_seed(seed, step):
    """The stateless seed of this replica's random draws (crops, flips, lighting, dropout) at `step`: a function
    of (run seed, step, replica) alone, so replicas draw their own and a resumed run draws the same."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return draws.fold_in(draws.fold_in([seed, 1], step), replica)


def forward(model, images, step, seed):
    """Training-mode float32 logits of this replica's images at `step`."""
    return tf.cast(model(images, training=True, seed=replica_seed(seed, step)), tf.float32)


def _distributed_step(model, optimizer, strategy, config):
    """(batch, step, stop) -> the step on every replica: gradients summed over the replicas, the §5 update on each;
    returns [loss sum, top-1 misses, top-5 misses, images, stop requests] summed over the replicas.
    With config.jit_compile each replica's forward and backward pass is one XLA computation (the sum over the
    replicas and the update stay outside it: XLA compiles one device's work)."""
    variables = model.trainable_variables

    def gradients(images, labels, step):
        with tf.GradientTape() as tape:
            logits = forward(model, images, step, config.seed)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            loss = tf.reduce_sum(losses) / config.batch_size  # Summed over the replicas: the batch's mean.
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, variables), losses, logits

    if config.jit_compile:
        gradients = tf.function(gradients, jit_compile=True)

    def replica_step(images, labels, step, stop):
        grads, losses, logits = gradients(images, labels, step)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        top1, top5 = (tf.reduce_sum(evaluation.top_k_misses(labels, logits, k)) for k in (1, 5))
        return tf.stack([tf.reduce_sum(losses), top1, top5, tf.cast(tf.size(labels), tf.float32), stop])

    def distributed_step(batch, step, stop):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, (*batch, step, stop)), None)

    return distributed_step


def make_train_step(model, optimizer, strategy, config):
    """A compiled step over the next batch of every replica; the epoch's plan says how many there are."""
    distributed_step = _distributed_step(model, optimizer, strategy, config)

    @tf.function
    def train_step(iterator, step, stop):
        return distributed_step(next(iterator), step, stop)

    return train_step


def make_service_step(model, optimizer, strategy, config):
    """A compiled step fed by a tf.data service, whose epoch has no planned length: it ends, on every worker at
        once (zeros returned, nothing run), at the first step some replica has no batch for; the loop sees it a step
    later (Run.take_step), without waiting on every step's result. The service's workers drop
        their partial batches, and under several trainers another one's prefetching may hold the last ones. Such a step
        is not run with the empty replicas TensorFlow would pad it with: the loss is scaled for a whole batch, and
        oneDNN's convolution gives wrongly shaped results on an empty batch."""
    distributed_step = _distributed_step(model, optimizer, strategy, config)

    def every_replica_has_images(batch):
        empty = strategy.run(lambda labels: tf.cast(tf.size(labels) == 0, tf.float32), (batch[1],))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, empty, None) == 0  # Over every worker's replicas.

    @tf.function
    def service_step(iterator, step, stop):
        batch = iterator.get_next_as_optional()

        def whole_step():
            value = batch.get_value()
            run = lambda: distributed_step(value, step, stop)  # noqa: E731
            return tf.cond(every_replica_has_images(value), run, lambda: tf.zeros(5))

        return tf.cond(batch.has_value(), whole_step, lambda: tf.zeros(5))

    return service_step


def start(config, flags_text=None):
    """The run in config.model_dir, checked and restored: a new one from step 0, or one continuing from its last
    checkpoint. Everything that can be wrong is found here, before step 1."""
    checks.check_config(config)
    strategy = devices.make_strategy(config)
    checks.check_devices(config)
    if config.strategy != "towers":
        checks.check_accelerators(config, strategy.extended.worker_devices)
    checks.check_batch(config, strategy.num_replicas_in_sync)
    data = checks.load_data(config)
    checks.check_resume(config, config.model_dir)
    workers = strategy.num_replicas_in_sync // devices.local_replicas(strategy)
    checks.check_shared_model_dir(config.model_dir, strategy, devices.worker_index(strategy), workers)
    run = Run(config, strategy, data)
    if run.chief:
        tf.io.gfile.makedirs(config.model_dir)
        run.write_settings(flags_text)
    run.restore()
    return run


class Run:
    """One training run: the model and optimizer under the strategy, where the run is (step, epoch, epoch_step,
    the same as the checkpointed TrainState holds), its checkpoints, summaries and console lines."""

    def __init__(self, config, strategy, data):
        self.config, self.strategy, self.data = config, strategy, data
        self.chief = devices.is_chief(strategy)
        keras.utils.set_random_seed(config.seed)  # The initial weights (§5) depend on the seed alone.
        with strategy.scope():
            self.model, self.optimizer = build_model(config, data)
        self.state = TrainState()
        self.checkpoints = checkpoints.RunCheckpoints(
            config.model_dir,
            config.keep_checkpoints,
            model=self.model,
            optimizer=self.optimizer,
            state=self.state,
            worker=None if self.chief else devices.worker_index(strategy),
        )
        self.writers = summaries.Writers(config.model_dir, enabled=self.chief)
        make_step = make_service_step if config.data_service else make_train_step
        self.train_step = make_step(self.model, self.optimizer, strategy, config)
        self.local_replicas = devices.local_replicas(strategy)
        self.pipelines = strategy.num_replicas_in_sync // self.local_replicas  # One input pipeline per worker.
        # The tf.data service job this run's trainers share (one per epoch: the job's name, then -epochN).
        self.service_job = f"alexnet-{hashlib.sha1(config.model_dir.encode()).hexdigest()[:12]}"
        self.profiler = summaries.Profiler(os.path.join(config.model_dir, "train"), config.profile_steps)
        self.step = self.epoch = self.epoch_step = 0
        self.learning_rate, self.drops, self.last_save = None, 0, time.monotonic()
        self.recent = collections.deque(maxlen=2)  # The last two steps' metrics, still on the device.

    def write_settings(self, flags_text):
        """config.json (what check_resume compares), labels.txt (the run names its own classes), flags.txt."""
        folder = self.config.model_dir
        checkpoints.write_file(os.path.join(folder, "config.json"), json.dumps(self.config.to_json(), indent=2))
        labels = "".join(f"{wnid}\t{name}\n" for wnid, name in self.data.labels)
        checkpoints.write_file(os.path.join(folder, "labels.txt"), labels)
        if flags_text is not None:
            checkpoints.write_file(os.path.join(folder, "flags.txt"), flags_text)

    def restore(self):
        """Continues from the last checkpoint in model_dir, if there is one; says where, and what the run is."""
        self.checkpoints.restore()
        self.step, self.epoch = int(self.state.step.numpy()), int(self.state.epoch.numpy())
        self.epoch_step = int(self.state.epoch_step.numpy())
        self.drops = int(self.state.drops.numpy())
        if self.chief:
            summaries.truncate_after(self.config.model_dir, self.step)  # Points of a killed run after it.
            if not self.step:  # A new run: its settings once, for comparing runs in TensorBoard.
                self.writers.hparams(self.config.model_dir, self.config.to_json())
        self.metrics = summaries.StepMetrics(self.state.epoch_sums.numpy())
        epochs_steps = [self.steps_in_epoch(e) for e in range(self.config.epochs)]
        self.progress = summaries.Progress(
            sum(epochs_steps), self.config.epochs, self.config.batch_size, self.step, enabled=self.chief
        )
        if self.finished():
            return
        if self.step:
            print(
                f"Resuming {self.config.model_dir} at step {self.step}: epoch {self.epoch + 1}, step "
                f"{self.epoch_step} of it",
                flush=True,
            )
        if self.chief:
            self._say_what_runs(epochs_steps[0])

    def _say_what_runs(self, epoch_steps):
        config, replicas = self.config, self.strategy.num_replicas_in_sync
        print(
            f"Training on {devices.describe(self.strategy, config)}: {replicas} replica(s) "
            f"({type(self.strategy).__name__}, {self.pipelines} worker(s)): batch "
            f"{config.batch_size} = {replicas} x {config.batch_size // replicas}, {epoch_steps} steps an epoch, "
            f"{config.epochs} epochs",
            flush=True,
        )
        if config.data_service:
            print(f"Training images from the tf.data service at {config.data_service}: job {self.service_job}-epochN")

    def finished(self):
        """Trained every epoch and evaluated: started again, the run has nothing to do."""
        return self.epoch >= self.config.epochs and tf.io.gfile.exists(self._eval_path)

    @property
    def _eval_path(self):
        return os.path.join(self.config.model_dir, "eval.json")

    def saved_evaluation(self):
        print(
            f"{self.config.model_dir} has finished training ({self.config.epochs} epochs, {self.step} steps): "
            "nothing to do"
        )
        with tf.io.gfile.GFile(self._eval_path) as f:
            return json.load(f)

    def take_step(self, batches, epoch, stop=0.0):
        """One step at the schedule's learning rate; its metrics (on the device), or None when the tf.data
        service's epoch has ended. A corrupt or short shard stops the run, named. stop (1.0: this worker was
        told to stop) travels in the metrics to every worker."""
        self.set_learning_rate()
        try:
            with ServiceWatch(self.config.data_service):
                metrics = self.train_step(batches, tf.constant(self.step, tf.int64), tf.constant(stop, tf.float32))
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
            # A corrupt record fails the input of the replica that reads it; with several devices another replica
            # may see its input end first (OutOfRangeError): the planned steps never run out otherwise.
            where = f"at step {self.step + 1} (epoch {epoch + 1})"
            raise checks.data_error(self.data.files["train"], "training", e, where) from None
        self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
        self.recent.append(metrics)
        self.metrics.add(metrics)
        # The service's epoch has ended when a step ran nothing. The step before this one has its result by now
        # (reading this one's would wait for it); once one step is empty every later one is.
        if self.config.data_service and len(self.recent) == 2 and self.recent[0].numpy()[3] == 0:
            self.drop_empty_steps()
            return None
        return metrics

    def drop_empty_steps(self):
        """Forgets the tf.data service's empty steps at the end of the recent ones (they ran nothing); returns
        whether there were any: the service's epoch is over."""
        empty = 0
        while self.recent and self.recent[-1].numpy()[3] == 0:
            self.recent.pop()
            empty += 1
        self.step, self.epoch_step = self.step - empty, self.epoch_step - empty
        del self.metrics.pending[len(self.metrics.pending) - empty :]
        return empty > 0

    def preempted(self):
        """Whether some worker was told to stop by the step before the last (the last may still be running)."""
        return len(self.recent) == 2 and self.recent[0].numpy()[4] > 0

    def set_learning_rate(self):
        """§5's rate for the next step (warm-up, drops), assigned when it changes."""
        value = recipe.learning_rate(self.config, self.step, self.drops)
        if value != self.learning_rate:
            self.optimizer.learning_rate.assign(value)
            self.learning_rate = value
        return value

    def log(self, epoch, epoch_steps):
        """The console's progress line and the train/ scalars, from the steps since the last one."""
        metrics = self.metrics.collect(self.step)
        rates = self.progress.step(self.step, epoch, self.epoch_step, epoch_steps, metrics)
        self.writers.scalars("train", self.step, {**metrics, **rates, "learning_rate": self.learning_rate})

    def checkpoint_due(self):
        config = self.config
        if config.checkpoint_every_steps and self.step % config.checkpoint_every_steps == 0:
            return True
        return time.monotonic() - self.last_save > 60 * config.checkpoint_every_minutes

    def save(self, best=False):
        """A checkpoint of where the run is now (and with best=True, first, the weights as best/)."""
        if self.config.data_service:
            self.drop_empty_steps()  # A step that ran nothing is not a step done.
        self.metrics.collect(self.step)  # Every step's loss counted (and checked) before it is saved.
        for name in ("step", "epoch", "epoch_step"):
            getattr(self.state, name).assign(getattr(self, name))
        self.state.epoch_sums.assign(self.metrics.epoch)
        self.checkpoints.save(self.step, best=best)
        self.last_save = time.monotonic()

    def steps_in_epoch(self, epoch):
        step_size = self.config.batch_size // self.pipelines
        sizes = self.data.sizes["train"]
        return data_input.epoch_plan(
            sizes, seed=self.config.seed, epoch=epoch, step_size=step_size, pipelines=self.pipelines
        )[1]

    def epoch_dataset(self, epoch, skip_steps):
        config, files, sizes = self.config, self.data.files["train"], self.data.sizes["train"]
        return self.strategy.distribute_datasets_from_function(
            lambda ctx: data_input.train_dataset(
                files,
                sizes,
                seed=config.seed,
                epoch=epoch,
                batch_size=ctx.get_per_replica_batch_size(config.batch_size),
                replicas=self.local_replicas,
                image_size=config.image_size,
                pipeline=ctx.input_pipeline_id,
                pipelines=ctx.num_input_pipelines,
                skip_steps=skip_steps,
                deterministic=config.deterministic,
                data_service=config.data_service or None,
                job=self.service_job,
            )
        )

    def evaluate(self, crops):
        config = self.config
        files, sizes = self.data.files["validation"], self.data.sizes["validation"]
        return evaluation.evaluate(
            self.model,
            self.strategy,
            files,
            sizes,
            batch_size=config.batch_size,
            image_size=config.image_size,
            crops=crops,
            labels=self.data.labels,
        )

    @property
    def samples(self):
        """Fixed images for the per-epoch summaries: 8 training images to augment, and a validation batch on
        which the gradient norms are taken."""
        if not hasattr(self, "_samples"):
            config, files, sizes = self.config, self.data.files, self.data.sizes
            size = dict(image_size=config.image_size)
            inputs = data_input.train_dataset(
                files["train"], sizes["train"], seed=config.seed, epoch=0, batch_size=8, **size
            )
            probe = data_input.eval_dataset(files["validation"], sizes["validation"], batch_size=32, **size)
            self._samples = (next(iter(inputs))[0], *next(iter(probe))[:2])
        return self._samples


def end_epoch(run, epoch, seconds):
    """§5's check after each epoch: the validation error, the schedule, the best weights, a checkpoint."""
    state, config = run.state, run.config
    if config.data_service:
        run.drop_empty_steps()
    run.metrics.collect(run.step)
    train = summaries.mean_metrics(run.metrics.epoch)
    validation = run.evaluate(crops=1)
    before = state.plateau
    plateau = before.update(validation["top1_error"], config.lr_patience, config.lr_drops)
    for name in ("best", "wait", "drops"):
        getattr(state, name).assign(getattr(plateau, name))
    run.drops = plateau.drops
    lr = run.set_learning_rate()
    scalars = {f"epoch/{k}": v for k, v in train.items()} | {"epoch/epoch": epoch + 1}
    if config.data_service:  # Dynamic sharding delivers each image at most once: what it did not is counted.
        planned, trained = int(run.data.sizes["train"].sum()), int(run.metrics.epoch[3])
        scalars["epoch/images_missed"] = planned - trained
        if run.chief:
            print(
                f"epoch {epoch + 1}: the tf.data service delivered {trained} of the {planned} training images; "
                f"{planned - trained} missed (each service worker's last partial batch, and what a lost worker held)",
                flush=True,
            )
    run.writers.scalars("train", run.step, scalars)
    keys = ("loss", "top1_error", "top5_error")
    run.writers.scalars("validation", run.step, {f"epoch/{k}": validation[k] for k in keys})
    if run.chief:
        run.writers.epoch(run.step, run.model, inputs=run.samples[0], probe=run.samples[1:], seed=[config.seed, epoch])
    if plateau.drops > before.drops:
        print(f"validation top-1 error has not improved for {config.lr_patience} epochs: learning rate now {lr:g}")
    run.epoch, run.epoch_step = epoch + 1, 0
    run.metrics.epoch = np.zeros(4)
    run.save(best=plateau.best < before.best)
    run.writers.flush()
    run.progress.epoch(epoch, train, validation, lr, seconds)


def weights_digest(model):
    """SHA-256 of every weight of the model, in order: which weights an evaluation saw (and whether workers
    agree)."""
    digest = hashlib.sha256()
    for v in model.weights:
        digest.update(np.ascontiguousarray(v.numpy()).tobytes())
    return digest.hexdigest()


def final_evaluation(run):
    """eval.json: the final weights on the whole validation split, on the centre crop or §4.1's ten patches."""
    config = run.config
    result = run.evaluate(crops=config.eval_crops)
    result["weights_sha256"] = weights_digest(run.model)
    run.writers.scalars(
        "eval", run.step, {f"{k}_{config.eval_crops}crop": result[k] for k in ("top1_error", "top5_error")}
    )
    run.writers.flush()
    if run.chief:
        checkpoints.write_file(os.path.join(config.model_dir, "eval.json"), json.dumps(result, indent=2))
    return result
