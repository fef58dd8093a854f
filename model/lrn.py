"""§3.3's local response normalization, with a gradient computed from the formula.

b_i = a_i / (k + alpha sum_{j = max(0, i - n/2)}^{min(N - 1, i + n/2)} a_j^2)^beta, over the channels of one tower.
The forward pass is TensorFlow's `tf.nn.local_response_normalization`. Its gradient is the formula, compiled by XLA
into a few loops over memory: TensorFlow's CPU `LRNGrad` kernel costs several forward passes (docs/benchmarks.md).
`paper_formula` and `paper_gradient` are the same in NumPy, float64, written from the paper: what the tests and
`tools.check` hold the kernels to.
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


@tf.function(jit_compile=True)
def _lrn_gradient(x, g):
    """With d_i = k + alpha sum_{j near i} x_j^2 and y_i = x_i d_i^-beta:
    dL/dx_i = g_i d_i^-beta - 2 alpha beta x_i sum_{j near i} g_j x_j d_j^(-beta-1)."""
    d = LRN["bias"] + LRN["alpha"] * _channel_window_sum(tf.square(x))
    if LRN["beta"] == 0.75:  # d^-0.75 without exp/log.
        rsqrt = tf.math.rsqrt(d)
        d_pow = rsqrt * tf.sqrt(rsqrt)
    else:
        d_pow = tf.pow(d, -LRN["beta"])
    window = _channel_window_sum(g * x * d_pow / d)
    return g * d_pow - (2 * LRN["alpha"] * LRN["beta"]) * x * window


def paper_formula(a):
    """§3.3 literally, in float64: the sum runs over channels max(0, i - n/2) .. min(N - 1, i + n/2)."""
    a = np.asarray(a, np.float64)
    return a * _paper_denominator(a) ** -LRN["beta"]


def paper_gradient(a, g):
    """The gradient of paper_formula at a, given the output's gradient g (the formula of _lrn_gradient)."""
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
def local_response_normalization(x):
    """§3.3 with the paper's constants: tf.nn.local_response_normalization, and its gradient from the formula."""
    y = tf.nn.local_response_normalization(x, **LRN)
    return y, lambda g: _lrn_gradient(x, g)


@keras.saving.register_keras_serializable(package=model.PACKAGE)
class LocalResponseNorm(keras.layers.Layer):
    """§3.3 across one tower's channels, always in float32 (no bfloat16 CPU kernel, and float16 overflows in the
    sum of squares)."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, x):
        return local_response_normalization(x)
