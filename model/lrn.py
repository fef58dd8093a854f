"""§3.3's local response normalization of §3.1's ReLU outputs, in the precision the network computes in, forward
and gradient.

b_i = a_i / (k + alpha sum_{j = max(0, i - n/2)}^{min(N - 1, i + n/2)} a_j^2)^beta, over the channels of one tower,
where a = ReLU(z), z the convolution's output: `tf.nn.local_response_normalization(a, depth_radius=2, bias=2,
alpha=1e-4, beta=0.75)`, which the tests hold this to. That op is not called: it has no bfloat16 kernel on the CPU
(a bfloat16 network paid two casts a layer each way) and its CPU kernel is a band-matrix contraction that costs
several elementwise passes. Here the forward pass and the gradient are each the formula compiled by XLA into one
loop over memory that reads its inputs in their own dtype and sums in float32 (a bfloat16 or float16 sum of
squares would round or overflow); only the result is rounded to the compute dtype. The ReLU runs in the same loop,
and its gradient in the gradient's, which saves a pass over the layer's largest tensor each way.
docs/benchmarks.md has the speed and the accuracy against `paper_formula`, which with `paper_gradient` is the same
in NumPy, float64, written from the paper: what the tests and `tools.check` hold the kernels to.
"""

import keras
import numpy as np
import tensorflow as tf

import model

LRN = dict(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)  # §3.3: n=5, k=2, alpha=1e-4, beta=0.75.


def _channel_window_sum(z):
    """sum_{|j-i| <= n/2} z_j over the channels: shifted slices of the zero-padded channels, which XLA fuses."""
    radius, channels = LRN["depth_radius"], z.shape[-1]
    padded = tf.pad(z, [[0, 0]] * (z.shape.rank - 1) + [[radius, radius]])
    return tf.add_n([padded[..., i : i + channels] for i in range(2 * radius + 1)])


def _scales(a):
    """(d^-beta, 1/d) with d_i = k + alpha sum_{j near i} a_j^2, float32; d^-0.75 as rsqrt(d) sqrt(rsqrt(d)), and
    no division (both cost several multiplications' time in the loop)."""
    assert LRN["beta"] == 0.75, "the loops below are written for §3.3's beta"
    rsqrt = tf.math.rsqrt(LRN["bias"] + LRN["alpha"] * _channel_window_sum(tf.square(a)))
    return rsqrt * tf.sqrt(rsqrt), tf.square(rsqrt)


@tf.function(jit_compile=True)
def _forward(z):
    a = tf.nn.relu(tf.cast(z, tf.float32))
    return tf.cast(a * _scales(a)[0], z.dtype)


@tf.function(jit_compile=True)
def _gradient(z, g):
    """With a = ReLU(z) and s_i = d_i^-beta: dL/da_i = g_i s_i - 2 alpha beta a_i sum_{j near i} g_j a_j s_j / d_j,
    and dL/dz_i = dL/da_i where z_i > 0, else 0."""
    a, g32 = tf.nn.relu(tf.cast(z, tf.float32)), tf.cast(g, tf.float32)
    scale, inverse = _scales(a)
    window = _channel_window_sum(g32 * a * scale * inverse)
    grad = g32 * scale - (2 * LRN["alpha"] * LRN["beta"]) * a * window
    return tf.cast(tf.where(z > 0, grad, 0.0), z.dtype)


def paper_formula(a):
    """§3.3 literally, in float64: the sum runs over channels max(0, i - n/2) .. min(N - 1, i + n/2)."""
    a = np.asarray(a, np.float64)
    return a * _paper_denominator(a) ** -LRN["beta"]


def paper_gradient(a, g):
    """The gradient of paper_formula at a, given the output's gradient g (the formula of _gradient)."""
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    d, beta = _paper_denominator(a), LRN["beta"]
    return g * d**-beta - 2 * LRN["alpha"] * beta * a * _paper_window_sum(g * a * d ** (-beta - 1))


def _paper_denominator(a):
    return LRN["bias"] + LRN["alpha"] * _paper_window_sum(a**2)


def _paper_window_sum(z):
    r, channels = LRN["depth_radius"], z.shape[-1]
    out = np.empty_like(z)
    for i in range(channels):
        out[..., i] = z[..., max(0, i - r) : min(channels, i + r + 1)].sum(-1)
    return out


@tf.custom_gradient
def relu_and_normalize(z):
    """§3.3 with the paper's constants on ReLU(z), in z's dtype (float32 inside), and its gradient from the
    formula."""
    return _forward(z), lambda g: _gradient(z, g)


@keras.saving.register_keras_serializable(package=model.PACKAGE)
class LocalResponseNorm(keras.layers.Layer):
    """§3.1's ReLU, then §3.3 across one tower's channels, in the layer's compute dtype (the network's: float32, or
    bfloat16/float16 under mixed precision), the sums in float32. It takes the convolution's output before its
    ReLU: a ReLU before it would change nothing but the time (ReLU(ReLU(z)) = ReLU(z))."""

    def call(self, z):
        return relu_and_normalize(z)
