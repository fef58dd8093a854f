"""The computation of a training step: the network and §5's optimizer, built once for every caller (the loop,
tools.check, the benchmarks, the tests), and the step over every replica, returning named metrics."""

import keras
import tensorflow as tf

from model import classifier, draws
from training import evaluation, recipe
from training.position import METRICS, PASSES


def build_model(config, num_classes, stats, tower_devices=True):
    """The classifier of config's settings and its optimizer, built (in the caller's strategy or device scope).
    tower_devices=False keeps the towers on the scope's one device."""
    model = classifier.build_classifier(
        num_classes,
        stats,
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


def pass_counts(passes, epoch):
    """Images of each of PASSES relative to `epoch`, from each image's pass."""
    slots = tf.clip_by_value(tf.cast(passes, tf.int64) - tf.cast(epoch, tf.int64) + 2, 0, len(PASSES) - 1)
    counts = tf.math.bincount(tf.cast(slots, tf.int32), minlength=len(PASSES), maxlength=len(PASSES), dtype=tf.float32)
    return tf.ensure_shape(counts, [len(PASSES)])  # Static, so the metrics are packed into one all-reduce.


def distributed_step(model, optimizer, strategy, config):
    """(batch, step, epoch, stop) -> the step on every replica: gradients summed over the replicas, the §5 update
    on each; returns the METRICS summed over the replicas, as one vector (stop: how many workers were told to stop).
    A batch is (images, labels) of the epoch's own pass, or (images, labels, passes) from a tf.data service's
    stream. With config.jit_compile each replica's forward and backward pass is one XLA computation (the sum over
    the replicas and the update stay outside it: XLA compiles one device's work)."""
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

    def replica_step(batch, step, epoch, stop):
        images, labels = batch[:2]
        passes = batch[2] if len(batch) > 2 else tf.fill(tf.shape(labels), tf.cast(epoch, tf.int64))
        grads, losses, logits = gradients(images, labels, step)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        top1, top5 = (tf.reduce_sum(evaluation.top_k_misses(labels, logits, k)) for k in (1, 5))
        counts = [tf.reduce_sum(losses), top1, top5, tf.cast(tf.size(labels), tf.float32), stop]
        return tf.concat([tf.stack(counts), pass_counts(passes, epoch)], 0)

    def step_on_replicas(batch, step, epoch, stop):
        summed = strategy.run(replica_step, (tuple(batch), step, epoch, stop))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, summed, None)

    return step_on_replicas


class Metrics:
    """A step's METRICS by name. They stay one tensor on the device, read to the host once, when first asked for:
    the loop looks at each step's a step late, so no step waits for its own."""

    def __init__(self, summed):
        self.summed, self._host = summed, None

    def values(self):
        if self._host is None:
            self._host = self.summed.numpy()
        return self._host

    def __getitem__(self, name):
        return self.values()[METRICS.index(name)]


def make_train_step(model, optimizer, strategy, config):
    """A compiled step over a batch for every replica (the next of a distributed dataset's iterator). Called as
    step(batch, step, stop, epoch=0), its metrics count the images by pass relative to `epoch`. The loop fetches
    the batch itself, so that waiting for it is not inside the step (a stop request can save while it waits)."""
    step_on_replicas = distributed_step(model, optimizer, strategy, config)

    @tf.function
    def train_step(batch, step, stop, epoch):
        return step_on_replicas(batch, step, epoch, stop)

    return lambda batch, step, stop, epoch=0: Metrics(train_step(batch, step, stop, tf.constant(epoch, tf.int64)))
