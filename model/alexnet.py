"""The paper's AlexNet (§3, Figure 2): two towers, LRN, overlapping pooling, dropout, the paper's init (§5).

Tower a's layers end in `_a`, tower b's in `_b`. The towers talk only where the paper's GPUs do: at the inputs of
conv3, fc6, fc7 and fc8. The same variables can be computed tower by tower or in a fused form (FORMS). Given
`tower_devices`, each tower's variables and ops are placed on its own device
(§3.2's model parallelism); without them both towers run wherever the caller places the model (under
MirroredStrategy: on each replica's device). Weight decay is part of the update rule (model/recipe.py).
"""

import contextlib

import keras
import tensorflow as tf

LRN = dict(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)  # §3.3: n=5, k=2, alpha=1e-4, beta=0.75.
WEIGHT_STD = 0.01  # §5: weights from N(0, 0.01).
DROPOUT = 0.5  # §4.2.
ONE_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")  # §5: biases 1 here (ReLUs start positive), 0 elsewhere.
CONV1_PAD = ((0, 0), (1, 2), (1, 2), (0, 0))  # 224 + 3 = 227: 11x11 stride 4 gives the paper's 55x55.
# (layer, filters or units per tower, kernel, stride, padding).
CONVS = (("conv1", 48, 11, 4, "valid"), ("conv2", 128, 5, 1, "same"), ("conv3", 192, 3, 1, "same"))
CONVS += (("conv4", 192, 3, 1, "same"), ("conv5", 128, 3, 1, "same"))
FCS = (("fc6", 2048), ("fc7", 2048))
# How the same variables are computed (checkpoints are interchangeable): "towers" layer by layer per tower (needed
# for tower_devices); "fused" and "grouped" on one device with fewer ops (AlexNet._call_fused). "auto": grouped on
# GPUs (grouped convs are fast there) without tower_devices, else towers: on CPU the towers' independent ops keep
# both cores busy and measured faster than fused (79-80% vs 70-75% of the roofline, benchmarks/training_step.py).
FORMS = ("auto", "towers", "fused", "grouped")


def _channel_window_sum(z):
    """sum_{|j-i| <= n/2} z_j over the channels: shifted slices of the zero-padded channels, which XLA fuses."""
    radius, channels = LRN["depth_radius"], z.shape[-1]
    padded = tf.pad(z, [[0, 0]] * (z.shape.rank - 1) + [[radius, radius]])
    return tf.add_n([padded[..., i : i + channels] for i in range(2 * radius + 1)])


@tf.function(jit_compile=True)
def _lrn_gradient(x, g):
    """dL/dx of §3.3 from the formula, compiled by XLA into a few loops over memory (~12 passes as separate ops)."""
    d = LRN["bias"] + LRN["alpha"] * _channel_window_sum(tf.square(x))
    if LRN["beta"] == 0.75:  # d^-0.75 without exp/log.
        rsqrt = tf.math.rsqrt(d)
        d_pow = rsqrt * tf.sqrt(rsqrt)
    else:
        d_pow = tf.pow(d, -LRN["beta"])
    window = _channel_window_sum(g * x * d_pow / d)
    return g * d_pow - (2 * LRN["alpha"] * LRN["beta"]) * x * window


@tf.custom_gradient
def local_response_normalization(x):
    """§3.3: tf.nn.local_response_normalization with the paper's constants, and its gradient from the formula.

    With d_i = k + alpha sum_{j near i} x_j^2 and y_i = x_i d_i^-beta:
    dL/dx_i = g_i d_i^-beta - 2 alpha beta x_i sum_{j near i} g_j x_j d_j^(-beta-1).
    TensorFlow's CPU LRNGrad kernel took ~4x the forward pass (586 ms vs 134 ms on conv1's 128x55x55x48 output):
    ~30% of a training step. _lrn_gradient is equal to it within 1e-6 and takes ~87 ms there.
    """
    y = tf.nn.local_response_normalization(x, **LRN)
    return y, lambda g: _lrn_gradient(x, g)


class LocalResponseNorm(keras.layers.Layer):
    """§3.3 across channels, always in float32 (no bfloat16 CPU kernel, float16 overflows in the sum of squares)."""

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, x):
        return local_response_normalization(x)


def _kernel_kwargs(name, std):
    return dict(
        name=name,
        activation="relu",  # §3.1: ReLU after every conv and fc layer but the last.
        kernel_initializer=keras.initializers.RandomNormal(stddev=std),
        bias_initializer="ones" if name[:-2] in ONE_BIAS else "zeros",
    )


class AlexNet(keras.Model):
    """Mean-subtracted float images (B, S, S, 3) -> logits (B, num_classes); the paper's S is 224."""

    def __init__(
        self,
        num_classes=1000,
        *,
        tower_devices=None,
        form="auto",
        dropout=DROPOUT,
        weight_std=WEIGHT_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if form not in FORMS:
            raise ValueError(f"form={form!r}: expected one of {FORMS}")
        if tower_devices and form not in ("auto", "towers"):
            raise ValueError(f"form={form!r} runs on one device: tower_devices need form='towers'")
        gpus = tf.config.list_logical_devices("GPU")
        if form == "auto":
            form = "grouped" if gpus and not tower_devices else "towers"
        if form == "grouped" and self.dtype_policy.compute_dtype == "float16" and not gpus:
            raise ValueError(
                "form='grouped' in float16 cannot train on CPU (TensorFlow has no CPU gradient for grouped "
                "float16 convolutions): use form='fused' there"
            )
        self.num_classes, self.tower_devices, self.form = num_classes, tower_devices, form
        self.dropout_rate, self.weight_std = dropout, weight_std
        towers = "ab"
        self.convs = {
            name: [
                keras.layers.Conv2D(n, k, strides=s, padding=p, **_kernel_kwargs(f"{name}_{t}", weight_std))
                for t in towers
            ]
            for name, n, k, s, p in CONVS
        }
        self.fcs = {
            name: [keras.layers.Dense(n, **_kernel_kwargs(f"{name}_{t}", weight_std)) for t in towers]
            for name, n in FCS
        }
        self.fc8 = keras.layers.Dense(
            num_classes,
            name="fc8",
            dtype="float32",  # Logits and softmax in float32 under mixed precision.
            kernel_initializer=keras.initializers.RandomNormal(stddev=weight_std),
        )
        self.lrn = [LocalResponseNorm(name=f"lrn{i}_{t}") for i in (1, 2) for t in towers]
        self.pool = keras.layers.MaxPooling2D(3, 2, name="pool")  # §3.4: overlapping, z=3, s=2.
        self.dropout = keras.layers.Dropout(dropout, name="dropout")
        self.flatten = keras.layers.Flatten(name="flatten")

    def _on(self, tower):
        """Device scope of tower 0 (a) or 1 (b)."""
        return tf.device(self.tower_devices[tower]) if self.tower_devices else contextlib.nullcontext()

    def _towers(self, fn, x):
        """[fn(0, x), fn(1, x)], each on its tower's device: fn picks its own tower's input or all of them."""
        return [self._placed(t, lambda x, t=t: fn(t, x), x) for t in range(2)]

    def _placed(self, tower, fn, x):
        """fn(x) with its forward and its backward ops on the tower's device (given tower_devices).

        tf.GradientTape places no gradient op: they land on the default device (measured: all of tower b's
        backward pass on the first device). So a placed tower computes its own gradients, under its device scope.
        """
        if not self.tower_devices:
            return fn(x)
        device, flat = self.tower_devices[tower], tf.nest.flatten(x)

        @tf.custom_gradient
        def placed(*inputs):
            with tf.device(device), tf.GradientTape() as tape:
                tape.watch(inputs)
                y = fn(tf.nest.pack_sequence_as(x, list(inputs)))

            def grad(dy, variables=None):
                variables = list(variables or ())
                with tf.device(device):
                    grads = tape.gradient(y, list(inputs) + variables, output_gradients=dy)
                # An input gradient nobody asks for (the images') is pruned from the compiled step.
                return grads[: len(inputs)], grads[len(inputs) :]

            return y, grad

        return placed(*flat)

    def build(self, input_shape):
        size = input_shape[1] + CONV1_PAD[1][0] + CONV1_PAD[1][1]
        c1 = (size - 11) // 4 + 1
        p1, p2 = (c1 - 3) // 2 + 1, ((c1 - 3) // 2 + 1 - 3) // 2 + 1
        p3 = (p2 - 3) // 2 + 1
        inputs = {"conv1": (None, size, size, 3), "conv2": (None, p1, p1, 48), "conv3": (None, p2, p2, 256)}
        inputs.update(conv4=(None, p2, p2, 192), conv5=(None, p2, p2, 192), fc6=(None, p3 * p3 * 256))
        inputs.update(fc7=(None, 4096))
        for name, layers in {**self.convs, **self.fcs}.items():
            for t, layer in enumerate(layers):
                with self._on(t):
                    layer.build(inputs[name])
        with self._on(0):
            self.fc8.build((None, 4096))

    def call(self, images, training=False):
        if self.form == "towers":
            return self._call_towers(images, training)
        return self._call_fused(images, training)

    def _call_towers(self, images, training):
        def stage1(t, x):  # conv1 -> LRN -> pool -> conv2 (own tower only) -> LRN -> pool.
            x = self.pool(self.lrn[t](self.convs["conv1"][t](x)))
            return self.pool(self.lrn[2 + t](self.convs["conv2"][t](x)))

        def stage2(t, x):  # conv3 sees both towers; conv4 and conv5 their own.
            x = self.convs["conv3"][t](tf.concat(x, -1))
            return self.pool(self.convs["conv5"][t](self.convs["conv4"][t](x)))

        def fc(name):  # fc6, fc7 see all of the previous layer (§3.5); dropout on their outputs (§4.2).
            return lambda t, x: self.dropout(self.fcs[name][t](tf.concat(x, -1)), training=training)

        x = self._towers(stage2, self._towers(stage1, tf.pad(images, CONV1_PAD)))
        x = self._towers(fc("fc6"), [self.flatten(part) for part in self._towers(lambda t, x: x[t], x)])
        x = self._towers(fc("fc7"), x)
        return self._placed(0, lambda x: self.fc8(tf.concat(x, -1)), x)

    def _call_fused(self, images, training):
        """The same function on one device with fewer, larger ops: layers that see both towers run as one op on
        the towers' kernels concatenated; own-tower convs as one grouped conv, or as two convs ("fused", for
        CPUs, where grouped convs are slow). LRN stays per tower (a tower's channel edges are real edges)."""

        def lrn(i, x):
            a, b = tf.split(x, 2, axis=-1)
            return tf.concat([self.lrn[i](a), self.lrn[i + 1](b)], axis=-1)

        x = self.pool(lrn(0, self._full_conv("conv1", tf.pad(images, CONV1_PAD))))
        x = self.pool(lrn(2, self._own_conv("conv2", x)))
        x = self._own_conv("conv4", self._full_conv("conv3", x))
        a, b = tf.split(self.pool(self._own_conv("conv5", x)), 2, axis=-1)
        x = tf.concat([self.flatten(a), self.flatten(b)], axis=-1)  # Each tower's positions, as the towers flatten.
        x = self.dropout(self._full_dense("fc6", x), training=training)
        x = self.dropout(self._full_dense("fc7", x), training=training)
        return self.fc8(x)

    def _weights(self, layers):
        dtype = layers[0].compute_dtype
        kernel = tf.concat([tf.cast(layer.kernel, dtype) for layer in layers], axis=-1)
        return kernel, tf.concat([tf.cast(layer.bias, dtype) for layer in layers], axis=-1), dtype

    def _full_conv(self, name, x):
        layers = self.convs[name]
        kernel, bias, dtype = self._weights(layers)
        y = tf.nn.conv2d(tf.cast(x, dtype), kernel, layers[0].strides, layers[0].padding.upper())
        return tf.nn.relu(tf.nn.bias_add(y, bias))

    def _own_conv(self, name, x):
        layers = self.convs[name]
        if self.form == "fused":
            a, b = tf.split(x, 2, axis=-1)
            return tf.concat([layers[0](a), layers[1](b)], axis=-1)
        return self._full_conv(name, x)  # Input depth 2x the kernels': TF convolves in 2 groups.

    def _full_dense(self, name, x):
        kernel, bias, dtype = self._weights(self.fcs[name])
        return tf.nn.relu(tf.nn.bias_add(tf.matmul(tf.cast(x, dtype), kernel), bias))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            tower_devices=self.tower_devices,
            form=self.form,
            dropout=self.dropout_rate,
            weight_std=self.weight_std,
        )
        return config


def build_alexnet(num_classes=1000, *, input_size=224, **kwargs):
    """The paper's AlexNet with its variables created (on the tower devices, if given)."""
    model = AlexNet(num_classes, name="alexnet", **kwargs)
    model(tf.zeros((1, input_size, input_size, 3)))
    return model
