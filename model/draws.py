"""Random draws that come out the same op by op and compiled by XLA (--jit_compile): TensorFlow's stateless float
draws and XLA's differ for one seed, its integer draws agree for seeds of non-negative numbers. So floats are made
from 24-bit integer draws, and every seed's sign bit is cleared first."""

import math

import tensorflow as tf

_BITS = 24  # A float32's mantissa.


def _non_negative(seed):
    seed = tf.convert_to_tensor(seed)
    return tf.bitwise.bitwise_and(seed, tf.constant(2**31 - 1, seed.dtype))


def split(seed, n):
    """n independent seeds from one."""
    return tf.unstack(tf.random.experimental.stateless_split(_non_negative(seed), n))


def fold_in(seed, data):
    """A seed for `data` (a step, a replica, a layer) from one."""
    return tf.random.experimental.stateless_fold_in(_non_negative(seed), data)


def integers(shape, seed, maxval):
    """Uniform on 0 .. maxval - 1."""
    return tf.random.stateless_uniform(shape, _non_negative(seed), 0, maxval, dtype=tf.int32)


def uniform(shape, seed):
    """U(0, 1), never 0 or 1."""
    return (tf.cast(integers(shape, seed, 2**_BITS), tf.float32) + 0.5) * 2.0**-_BITS


def normal(shape, seed, stddev=1.0):
    """N(0, stddev), by Box-Muller from two uniform draws."""
    radius_seed, angle_seed = split(seed, 2)
    radius = tf.sqrt(-2.0 * tf.math.log(uniform(shape, radius_seed)))
    return stddev * radius * tf.cos(2 * math.pi * uniform(shape, angle_seed))


def dropout(x, rate, seed):
    """Each element zeroed with probability `rate`, the others scaled by 1 / (1 - rate)."""
    keep = uniform(tf.shape(x), seed) >= rate
    return tf.where(keep, x * tf.cast(1 / (1 - rate), x.dtype), tf.zeros_like(x))
