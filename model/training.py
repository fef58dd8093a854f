"""The training loop: the §5 recipe under any tf.distribute strategy, resumable at any step.

`train(config)` is the whole run. The loop is written out (strategy.run inside a tf.function) rather than left to
Keras' fit, which restarts an interrupted epoch from its first step, keeps no schedule state across a restart and
has an open failure under MultiWorkerMirroredStrategy (keras-team/keras#20585). One loop serves the mirrored
replicas, the towers on two devices (§3.2) and several workers.

Exact resume: a run killed at any moment and started again with the same command continues from its last
checkpoint with the weights, momentum, schedule, data position and random draws it would have had: the data
order is a function of (seed, epoch) (pipeline/input.py), and a step's random draws a function of (seed, step,
replica).
"""

import hashlib
import json
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from model import checkpoints, checks, classifier, evaluation, recipe, summaries
from pipeline import input as data_input


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


def make_strategy(config):
    """MirroredStrategy over the given devices (default: every GPU, else every CPU device); for towers on two
    devices the default strategy (the model places its towers itself: OneDeviceStrategy would create every
    variable on its one device); MultiWorkerMirroredStrategy over the cluster TF_CONFIG describes."""
    if config.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.strategy == "towers":
        return tf.distribute.get_strategy()
    devices = list(config.mirrored_devices) or [d.name for d in tf.config.list_logical_devices("GPU")]
    return tf.distribute.MirroredStrategy(devices or [d.name for d in tf.config.list_logical_devices("CPU")])


def is_chief(strategy):
    """Whether this process writes the run's outputs: always, but under MultiWorkerMirroredStrategy the chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_id == 0)


def make_optimizer(config):
    """§5's update rule; under float16, wrapped in dynamic loss scaling (float16 gradients underflow without it)."""
    optimizer = recipe.PaperSGD(config.learning_rate, config.momentum, config.weight_decay)
    return keras.optimizers.LossScaleOptimizer(optimizer) if config.precision == "mixed_float16" else optimizer


def replica_seed(seed, step):
    """The stateless seed of this replica's random draws (crops, flips, lighting, dropout) at `step`: a function
    of (run seed, step, replica) alone, so replicas draw their own and a resumed run draws the same."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.random.experimental.stateless_fold_in(tf.random.experimental.stateless_fold_in([seed, 1], step), replica)


def forward(model, images, step, seed):
    """Training-mode float32 logits of this replica's images at `step`."""
    return tf.cast(model(images, training=True, seed=replica_seed(seed, step)), tf.float32)


def make_train_step(model, optimizer, strategy, config):
    """A compiled step: one batch per replica, gradients summed over the replicas, the §5 update on each."""
    variables = model.trainable_variables

    def replica_step(images, labels, step):
        with tf.GradientTape() as tape:
            logits = forward(model, images, step, config.seed)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            loss = tf.reduce_sum(losses) / config.batch_size  # Summed over the replicas: the batch's mean.
            scaled = optimizer.scale_loss(loss)
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables, strict=True))
        top1, top5 = (tf.reduce_sum(evaluation.top_k_misses(labels, logits, k)) for k in (1, 5))
        return tf.stack([tf.reduce_sum(losses), top1, top5, tf.cast(tf.size(labels), tf.float32)])

    def run(batch, step):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, (*batch, step)), None)

    def every_replica_has_images(batch):
        empty = strategy.run(lambda labels: tf.cast(tf.size(labels) == 0, tf.float32), (batch[1],))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, empty, None) == 0  # Over every worker's replicas.

    @tf.function
    def train_step(iterator, step):
        if not config.data_service:  # Steps counted from the epoch's plan.
            return run(next(iterator), step)
        # From a tf.data service the epoch ends, on every worker at once (zeros), at the first step some replica
        # has no batch for: the service's workers drop their partial batches, and under several trainers another
        # one's prefetching may hold the last ones. Such a step is not run with the empty replicas TensorFlow
        # would pad it with: the loss is scaled for a whole batch, and oneDNN's convolution gives wrongly shaped
        # results on an empty batch.
        batch = iterator.get_next_as_optional()

        def whole_step():
            value = batch.get_value()
            return tf.cond(every_replica_has_images(value), lambda: run(value, step), lambda: tf.zeros(4))

        return tf.cond(batch.has_value(), whole_step, lambda: tf.zeros(4))

    return train_step


class Run:
    """One training run's objects: the model and optimizer under the strategy, its state and checkpoints, its
    summaries."""

    def __init__(self, config, strategy, data):
        self.config, self.strategy, self.data = config, strategy, data
        self.chief = is_chief(strategy)
        # Every worker writes checkpoints (saving may need them all); only the chief's are kept (TF's guide).
        keras.utils.set_random_seed(config.seed)  # The initial weights (§5) depend on the seed alone.
        task = getattr(getattr(strategy, "cluster_resolver", None), "task_id", 0)
        self.work_dir = config.model_dir if self.chief else os.path.join(config.model_dir, f".worker-{task}")
        with strategy.scope():
            self.model = classifier.build_classifier(
                len(data.labels),
                data.stats,
                image_size=config.image_size,
                crop_size=config.crop_size,
                lighting_std=config.lighting_std,
                precision=config.precision,
                tower_devices=config.tower_devices or None,
                dropout=config.dropout,
                weight_std=config.weight_std,
            )
            self.optimizer = make_optimizer(config)
            self.optimizer.build(self.model.trainable_variables)
        self.state = TrainState()
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, state=self.state)
        folder = os.path.join(self.work_dir, checkpoints.CHECKPOINTS)
        self.manager = tf.train.CheckpointManager(self.checkpoint, folder, max_to_keep=config.keep_checkpoints)
        best = os.path.join(self.work_dir, checkpoints.BEST)
        self.best = tf.train.CheckpointManager(tf.train.Checkpoint(model=self.model), best, max_to_keep=1)
        self.writers = summaries.Writers(config.model_dir, enabled=self.chief)
        self.train_step = make_train_step(self.model, self.optimizer, strategy, config)
        self.local_replicas = evaluation.local_replicas(strategy)
        self.pipelines = strategy.num_replicas_in_sync // self.local_replicas  # One input pipeline per worker.
        # The tf.data service job this run's trainers share (one per epoch: the job's name, then -epochN).
        self.service_job = f"alexnet-{hashlib.sha1(config.model_dir.encode()).hexdigest()[:12]}"

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

    def restore(self):
        """Continues the run in model_dir, if there is one; returns the step it continues from."""
        latest = tf.train.latest_checkpoint(os.path.join(self.config.model_dir, checkpoints.CHECKPOINTS))
        if latest is None:
            return 0
        self.checkpoint.restore(latest).assert_consumed()
        step = int(self.state.step.numpy())
        if self.chief:
            summaries.truncate_after(self.config.model_dir, step)
        return step

    def save(self, best=False):
        self.manager.save(checkpoint_number=int(self.state.step.numpy()))
        if best:
            self.best.save(checkpoint_number=int(self.state.step.numpy()))
        if not self.chief:
            shutil.rmtree(self.work_dir, ignore_errors=True)

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


class _Interval:
    """Metrics of the steps since the last log line, fetched from the device only then (no sync every step)."""

    def __init__(self):
        self.pending, self.epoch = [], np.zeros(4)

    def add(self, metrics):
        self.pending.append(metrics)

    def collect(self, step):
        """Mean loss and errors of the pending steps; raises when the loss stopped being a number."""
        sums = np.sum([m.numpy() for m in self.pending], axis=0) if self.pending else np.zeros(4)
        steps, self.pending = len(self.pending), []
        checks.finite(sums, f"the loss is not a number at step {step}: lower --learning_rate (or add --warmup_steps)")
        self.epoch += sums
        return {**summaries.mean_metrics(sums), "steps": steps}


def _learning_rate(run, step):
    value = recipe.learning_rate(run.config, step, int(run.state.drops.numpy()))
    run.optimizer.learning_rate.assign(value)
    return value


def train_epoch(run, epoch, progress):
    """The rest of epoch `epoch` from where the state says it stopped; checkpoints on the way."""
    config, state = run.config, run.state
    steps, start = run.steps_in_epoch(epoch), int(state.epoch_step.numpy())
    iterator, interval = iter(run.epoch_dataset(epoch, start)), _Interval()
    interval.epoch = state.epoch_sums.numpy().copy()
    step, last_save, profile = int(state.step.numpy()), time.monotonic(), tuple(config.profile_steps)
    lr = _learning_rate(run, step)
    for epoch_step in range(start + 1, steps + 1):
        if step <= config.warmup_steps:
            lr = _learning_rate(run, step)
        if profile and step + 1 == profile[0]:
            tf.profiler.experimental.start(os.path.join(config.model_dir, "train"))
        with tf.profiler.experimental.Trace("train", step_num=step + 1, _r=1):  # _r=1 marks a step.
            metrics = _next_step(run, iterator, step, epoch)
        if config.data_service and metrics.numpy()[3] == 0:
            steps = epoch_step - 1  # The service's epoch ended (each of its workers drops a partial batch).
            break
        interval.add(metrics)
        step += 1
        if profile and step == profile[1]:
            interval.pending[-1].numpy()
            tf.profiler.experimental.stop()
        if step % config.log_every_steps == 0 or epoch_step == steps:
            metrics = interval.collect(step)
            rates = progress.step(step, epoch, epoch_step, steps, metrics)
            run.writers.scalars("train", step, {**metrics, **rates, "learning_rate": lr})
        due = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        due = due or time.monotonic() - last_save > 60 * config.checkpoint_every_minutes
        if due and epoch_step < steps:
            interval.collect(step)
            _set_state(state, step=step, epoch=epoch, epoch_step=epoch_step, epoch_sums=interval.epoch)
            run.save()
            last_save = time.monotonic()
    interval.collect(step)
    _set_state(state, step=step, epoch=epoch, epoch_step=steps, epoch_sums=interval.epoch)
    return interval.epoch


def _next_step(run, iterator, step, epoch):
    try:
        return run.train_step(iterator, tf.constant(step, tf.int64))
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
        # A corrupt record fails the input of the replica that reads it; with several devices another replica may
        # see its input end first (OutOfRangeError): the planned steps never run out otherwise.
        where = f"at step {step + 1} (epoch {epoch + 1})"
        raise checks.data_error(run.data.files["train"], "training", e, where) from None


def _set_state(state, **values):
    for name, value in values.items():
        getattr(state, name).assign(value)


def end_epoch(run, epoch, sums, progress, seconds):
    """§5's check after each epoch: the validation error, the schedule, the best weights, a checkpoint."""
    state, config = run.state, run.config
    validation = run.evaluate(crops=1)
    before = state.plateau
    plateau = before.update(validation["top1_error"], config.lr_patience, config.lr_drops)
    _set_state(state, best=plateau.best, wait=plateau.wait, drops=plateau.drops)
    step = int(state.step.numpy())
    train = summaries.mean_metrics(sums)
    lr = _learning_rate(run, step)
    run.writers.scalars("train", step, {f"epoch/{k}": v for k, v in train.items()} | {"epoch/epoch": epoch + 1})
    keys = ("loss", "top1_error", "top5_error")
    run.writers.scalars("validation", step, {f"epoch/{k}": validation[k] for k in keys})
    if run.chief:
        run.writers.epoch(step, run.model, inputs=run.samples[0], probe=run.samples[1:], seed=[config.seed, epoch])
    if plateau.drops > before.drops:
        print(f"validation top-1 error has not improved for {config.lr_patience} epochs: learning rate now {lr:g}")
    _set_state(state, epoch=epoch + 1, epoch_step=0, epoch_sums=np.zeros(4))
    run.save(best=plateau.best < before.best)
    run.writers.flush()
    progress.epoch(epoch, train, validation, lr, seconds)


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
    step = int(run.state.step.numpy())
    run.writers.scalars("eval", step, {f"{k}_{config.eval_crops}crop": result[k] for k in ("top1_error", "top5_error")})
    run.writers.flush()
    if run.chief:
        with tf.io.gfile.GFile(os.path.join(config.model_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def train(config, flags_text=None):
    """Trains (or continues training) with the paper's recipe; returns the final evaluation (eval.json).

    flags_text, the command's flags, is written to model_dir/flags.txt once the checks have passed."""
    checks.check_config(config)
    strategy = make_strategy(config)
    checks.check_devices(config)
    checks.check_batch(config, strategy.num_replicas_in_sync)
    data = checks.load_data(config)
    checks.check_resume(config, config.model_dir)
    run = Run(config, strategy, data)
    tf.io.gfile.makedirs(config.model_dir)
    if run.chief:
        with tf.io.gfile.GFile(os.path.join(config.model_dir, "config.json"), "w") as f:
            json.dump(config.to_json(), f, indent=2)
        labels = "".join(f"{wnid}\t{name}\n" for wnid, name in data.labels)  # The run names its own classes.
        with tf.io.gfile.GFile(os.path.join(config.model_dir, "labels.txt"), "w") as f:
            f.write(labels)
        if flags_text is not None:
            with tf.io.gfile.GFile(os.path.join(config.model_dir, "flags.txt"), "w") as f:
                f.write(flags_text)
    start = run.restore()
    state = run.state
    epochs_steps = [run.steps_in_epoch(e) for e in range(config.epochs)]
    eval_path = os.path.join(config.model_dir, "eval.json")
    if int(state.epoch.numpy()) >= config.epochs and tf.io.gfile.exists(eval_path):
        print(f"{config.model_dir} has finished training ({config.epochs} epochs, {start} steps): nothing to do")
        with tf.io.gfile.GFile(eval_path) as f:
            return json.load(f)
    if start:
        epoch, epoch_step = int(state.epoch.numpy()), int(state.epoch_step.numpy())
        print(f"Resuming {config.model_dir} at step {start}: epoch {epoch + 1}, step {epoch_step} of it", flush=True)
    if run.chief:
        replicas = strategy.num_replicas_in_sync
        print(
            f"Training on {replicas} replica(s) ({type(strategy).__name__}, {run.pipelines} worker(s)): batch "
            f"{config.batch_size} = {replicas} x {config.batch_size // replicas}, {epochs_steps[0]} steps an epoch, "
            f"{config.epochs} epochs",
            flush=True,
        )
        if config.data_service:
            print(f"Training images from the tf.data service at {config.data_service}: job {run.service_job}-epochN")
    progress = summaries.Progress(sum(epochs_steps), config.epochs, config.batch_size, start, enabled=run.chief)
    for epoch in range(int(state.epoch.numpy()), config.epochs):
        began = time.monotonic()
        end_epoch(run, epoch, train_epoch(run, epoch, progress), progress, time.monotonic() - began)
    return final_evaluation(run)
