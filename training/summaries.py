"""What a run shows: TensorBoard summaries and the console's progress lines.

TensorBoard (under model_dir): `train/` every log interval (loss, top-1/top-5 error, learning rate, images/s,
step time) and every epoch (its errors, weight histograms, gradient norms per layer, conv1's kernels as in
Figure 3, a grid of augmented inputs); `validation/` every epoch; `eval/` the final evaluation. Every point is
indexed by the global step. model_dir itself holds the run's settings for the HParams dashboard, which lists the
runs below a --logdir side by side with their final errors (HPARAM_METRICS).
"""

import contextlib
import datetime
import os
import time

import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorflow.core.util import event_pb2

SPLITS = ("train", "validation", "eval")
# What the HParams dashboard shows beside each run's settings: (the split's folder, the scalar's tag). A metric's
# value there is its last point: the last epoch's, or the final evaluation's.
HPARAM_METRICS = [("validation", f"epoch/{k}") for k in ("top1_error", "top5_error", "loss")]
HPARAM_METRICS += [("train", "epoch/loss")]
HPARAM_METRICS += [("eval", f"{k}_{crops}crop") for crops in (10, 1) for k in ("top1_error", "top5_error")]


def to_displayable(images):
    """Mean-subtracted float images, each stretched to [0, 1]."""
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    return (images - low) / tf.maximum(high - low, 1e-8)


def grid(images, columns, gap=1):
    """Images (n, h, w, c), each already in [0, 1], tiled in rows of `columns` with `gap` px between: (1, H, W, c)."""
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    x = tf.pad(images, [[0, 0], [0, gap], [0, gap], [0, 0]])
    rows = -(-n // columns)
    x = tf.pad(x, [[0, rows * columns - n], [0, 0], [0, 0], [0, 0]])
    x = tf.reshape(x, [rows, columns, h + gap, w + gap, images.shape[-1]])
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3, 4]), [1, rows * (h + gap), columns * (w + gap), -1])


def filter_grid(kernels, columns=16):
    """Figure 3: conv1 kernels (k, k, 3, n), each scaled to [0, 1], tiled in rows of `columns` with 1px gaps."""
    return grid(to_displayable(tf.transpose(kernels, [3, 0, 1, 2])), columns)


def histogram(name, values, buckets=30):
    """`tf.summary.histogram`'s summary ([buckets, 3]: left edge, right edge, count; all in the last bucket when
    every value is the same) in memory of the values' size: TensorBoard's own counts through a float64 one-hot of
    every value, 4.5 GB for fc6's 19M weights, which was most of a run's peak memory (docs/benchmarks.md)."""
    values = tf.reshape(values, [-1])
    low, high = tf.reduce_min(values), tf.reduce_max(values)
    if high > low:
        counts = tf.histogram_fixed_width(values, tf.stack([low, high]), nbins=buckets)
        edges = tf.linspace(tf.cast(low, tf.float64), tf.cast(high, tf.float64), buckets + 1)
        edges = tf.concat([edges[:-1], [tf.cast(high, tf.float64)]], 0)  # The last edge is the maximum, exactly.
    else:
        counts = tf.one_hot(buckets - 1, buckets, on_value=tf.size(values), off_value=0)
        edges = tf.fill([buckets + 1], tf.cast(high, tf.float64))
    table = tf.stack([edges[:-1], edges[1:], tf.cast(counts, tf.float64)], axis=1)
    return tf.summary.write(name, table, metadata=histogram_metadata.create_summary_metadata(None, None))


def conv1_kernels(net):
    """Tower a's 48 kernels, then tower b's: Figure 3's upper and lower halves."""
    return tf.concat([tf.convert_to_tensor(net.conv1_a.kernel), tf.convert_to_tensor(net.conv1_b.kernel)], -1)


def gradient_norms(model, images, labels, seed):
    """{variable path: norm of the loss's gradient} on one batch, in training mode."""
    with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True, seed=seed), tf.float32)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: tf.norm(tf.cast(g, tf.float32)) for v, g in zip(model.trainable_variables, grads, strict=True)}


class Writers:
    """One summary writer per split; no-ops on workers other than the chief."""

    def __init__(self, model_dir, enabled=True):
        make = (lambda split: tf.summary.create_file_writer(os.path.join(model_dir, split))) if enabled else None
        self.writers = {split: make(split) if enabled else tf.summary.create_noop_writer() for split in SPLITS}

    def scalars(self, split, step, values):
        with self.writers[split].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def epoch(self, step, model, *, inputs, probe, seed):
        """Per epoch: weight histograms, gradient norms on a fixed probe batch, Figure 3, augmented inputs."""
        with self.writers["train"].as_default(step=step):
            for v in model.net.weights:
                histogram(f"weights/{v.path}", v)
            for path, norm in gradient_norms(model, *probe, seed).items():
                tf.summary.scalar(f"gradient_norm/{path}", norm)
            tf.summary.image("conv1_filters", filter_grid(conv1_kernels(model.net)))
            augmented = to_displayable(model.preprocess(inputs, training=True, seed=seed))
            tf.summary.image("inputs/augmented", grid(augmented, columns=4, gap=2))

    @staticmethod
    def hparams(model_dir, settings):
        """The run's settings ({name: value}) for the HParams dashboard, in model_dir itself: once, by a run that
        starts at step 0 (one killed before its first checkpoint writes them again, in place of the first)."""
        from tensorboard.plugins.hparams import api as hp

        for path in tf.io.gfile.glob(os.path.join(model_dir, "events.out.tfevents.*")):
            tf.io.gfile.remove(path)
        values = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in settings.items()}
        writer = tf.summary.create_file_writer(model_dir)
        with writer.as_default():
            metrics = [hp.Metric(tag, group=split) for split, tag in HPARAM_METRICS]
            hp.hparams_config(hparams=[hp.HParam(k) for k in values], metrics=metrics)
            hp.hparams(values, trial_id=os.path.basename(os.path.normpath(model_dir)))
        writer.flush()

    def flush(self):
        for writer in self.writers.values():
            writer.flush()


def truncate_after(model_dir, step):
    """Drops the summaries of steps after `step` (written by a run killed after its last checkpoint), so a
    resumed run's points do not collide with them. A killed writer's torn last record is dropped too."""
    for split in SPLITS:
        for path in tf.io.gfile.glob(os.path.join(model_dir, split, "events.out.tfevents.*")):
            kept, dropped = [], False
            try:
                for record in tf.data.TFRecordDataset(path):
                    event = event_pb2.Event.FromString(record.numpy())
                    if event.step > step and event.HasField("summary"):
                        dropped = True
                    else:
                        kept.append(record.numpy())
            except tf.errors.DataLossError:
                dropped = True
            if dropped:
                with tf.io.TFRecordWriter(path + ".tmp") as writer:
                    for record in kept:
                        writer.write(record)
                tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _duration(seconds):
    return str(datetime.timedelta(seconds=round(max(seconds, 0))))


class Progress:
    """Console lines: one every log interval (step, epoch, loss, error, images/s, time left for the epoch and the
    run) and one per epoch."""

    def __init__(self, total_steps, epochs, batch_size, start_step=0, enabled=True):
        self.total_steps, self.epochs, self.batch_size, self.enabled = total_steps, epochs, batch_size, enabled
        self.last_time, self.last_step = time.perf_counter(), start_step

    def step(self, position, epoch_steps, metrics):
        """Prints a progress line; returns images/s and the step time since the previous one."""
        step, epoch, epoch_step = position.step, position.epoch, position.epoch_step
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / max(step - self.last_step, 1)
        self.last_time, self.last_step = now, step
        rates = {"images_per_second": self.batch_size / seconds_per_step, "step_time_ms": 1000 * seconds_per_step}
        if self.enabled:
            print(
                f"step {step}/{self.total_steps}  epoch {epoch + 1}/{self.epochs} ({epoch_step}/{epoch_steps})  "
                f"loss {metrics['loss']:.3f}  top-1 err {metrics['top1_error']:.1%}  "
                f"{rates['images_per_second']:.1f} img/s  "
                f"epoch left {_duration((epoch_steps - epoch_step) * seconds_per_step)}  "
                f"run left {_duration((self.total_steps - step) * seconds_per_step)}",
                flush=True,
            )
        return rates

    def epoch(self, epoch, train, validation, learning_rate, seconds):
        self.last_time = time.perf_counter()  # Validation time is not training throughput.
        if self.enabled:
            print(
                f"epoch {epoch + 1}/{self.epochs}: train loss {train['loss']:.3f} top-1 err {train['top1_error']:.1%}"
                f" | validation loss {validation['loss']:.3f} top-1 err {validation['top1_error']:.1%} top-5 err "
                f"{validation['top5_error']:.1%} | lr {learning_rate:g} | {_duration(seconds)}",
                flush=True,
            )


class Profiler:
    """A trace of the steps profile_steps (FIRST, LAST) names, for TensorBoard's profile pages; a run resumed
    inside the window traces the steps it still takes there."""

    def __init__(self, log_dir, profile_steps):
        self.log_dir, self.window, self.tracing = log_dir, tuple(profile_steps), False

    @contextlib.contextmanager
    def step(self, step):
        """Around step `step` (counted from 1): marked as a step (_r=1) for the step-time page."""
        first, last = self.window or (0, -1)
        if not self.tracing and first <= step <= last:
            tf.profiler.experimental.start(self.log_dir)
            self.tracing = True
        with tf.profiler.experimental.Trace("train", step_num=step, _r=1):
            yield
        if self.tracing and step >= last:
            tf.test.experimental.sync_devices()  # The step's device work inside the trace.
            tf.profiler.experimental.stop()
            self.tracing = False


def mean_metrics(sums):
    """position.SUMS (loss sum, top-1 misses, top-5 misses, images) summed over steps -> means."""
    loss, top1, top5, images = (float(v) for v in np.asarray(sums))
    images = max(images, 1.0)
    return {"loss": loss / images, "top1_error": top1 / images, "top5_error": top5 / images}
