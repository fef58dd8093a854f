"""TensorBoard beyond Keras' own callback: throughput and learning rate per step, sample inputs, conv1 filters."""

import os
import time

import keras
import tensorflow as tf


def to_displayable(images):
    """Mean-subtracted float images, each stretched to [0, 1]."""
    low = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    return (images - low) / tf.maximum(high - low, 1e-8)


def filter_grid(kernels, columns=16):
    """Figure 3: conv1 kernels (k, k, 3, n), each scaled to [0, 1], tiled in rows of `columns` with 1px gaps."""
    k, n = kernels.shape[0], kernels.shape[-1]
    x = tf.pad(to_displayable(tf.transpose(kernels, [3, 0, 1, 2])), [[0, 0], [0, 1], [0, 1], [0, 0]])
    rows = -(-n // columns)
    x = tf.pad(x, [[0, rows * columns - n], [0, 0], [0, 0], [0, 0]])
    x = tf.reshape(x, [rows, columns, k + 1, k + 1, 3])
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3, 4]), [1, rows * (k + 1), columns * (k + 1), 3])


class Summaries(keras.callbacks.Callback):
    """Writes to <logdir>/train: images/s and learning rate every `every` steps; augmented sample inputs at the
    start; conv1's 96 kernels, tower a's 48 above tower b's (Figure 3), after every epoch."""

    def __init__(self, logdir, *, batch_size, sample_images, every=20):
        super().__init__()
        self.logdir, self.batch_size, self.sample_images, self.every = logdir, batch_size, sample_images, every

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(os.path.join(self.logdir, "train"))
        preprocess = self.model.get_layer("preprocess")
        with self.writer.as_default(step=0):
            tf.summary.image("inputs/augmented", to_displayable(preprocess(self.sample_images, training=True)), 8)

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.steps = time.perf_counter(), 0  # Validation time is not training throughput.

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps % self.every:
            return
        now = time.perf_counter()
        step = int(self.model.optimizer.iterations.numpy())
        with self.writer.as_default(step=step):
            tf.summary.scalar("throughput/images_per_second", self.steps * self.batch_size / (now - self.start))
            tf.summary.scalar("learning_rate", float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.start, self.steps = now, 0

    def on_epoch_end(self, epoch, logs=None):
        conv1 = self.model.get_layer("alexnet").convs["conv1"]
        kernels = tf.concat([tf.convert_to_tensor(layer.kernel) for layer in conv1], axis=-1)
        with self.writer.as_default(step=epoch + 1):
            tf.summary.image("conv1_filters", filter_grid(kernels))
        self.writer.flush()
