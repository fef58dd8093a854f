"""The paper's AlexNet (§3, Figure 2): two towers, LRN, overlapping pooling, dropout, the paper's init (§5).

Tower a's layers end in `_a`, tower b's in `_b`; fc8 sits with tower a. The towers meet only where the paper's
GPUs talk: at the inputs of conv3, fc6, fc7 and fc8 (§3.5). Given `tower_devices`, each tower's variables and its
forward and backward ops live on its own device (§3.2, model/placement.py); without them both towers run wherever
the caller places the model (under MirroredStrategy: on each replica's device). Weight decay is part of the
update rule (training/recipe.py).
"""

import keras
import tensorflow as tf

import model
from model import draws, placement
from model.lrn import LocalResponseNorm

WEIGHT_STD = 0.01  # §5: weights from N(0, 0.01).
DROPOUT = 0.5  # §4.2.
ONE_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")  # §5: biases 1 here (ReLUs start positive), 0 elsewhere.
NORMALIZED = ("conv1", "conv2")  # §3.3: LRN after these layers' ReLU.
CONV1_PAD = ((0, 0), (1, 2), (1, 2), (0, 0))  # 224 + 3 = 227: 11x11 at stride 4 then gives the paper's 55x55.
# Per tower: (layer, filters, kernel, stride, padding) and (layer, units).
CONVS = (("conv1", 48, 11, 4, "valid"), ("conv2", 128, 5, 1, "same"), ("conv3", 192, 3, 1, "same"))
CONVS += (("conv4", 192, 3, 1, "same"), ("conv5", 128, 3, 1, "same"))
FCS = (("fc6", 2048), ("fc7", 2048))


@keras.saving.register_keras_serializable(package=model.PACKAGE)
class Dropout(keras.layers.Layer):
    """§4.2: zero each unit with probability `rate` in training (and scale the rest by 1 / (1 - rate)).

    The mask is a function of the `seed` passed in, so each replica and step can draw its own and a resumed run
    draws the same ones (Keras' Dropout draws one mask for every replica under MirroredStrategy)."""

    def __init__(self, rate, salt, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.salt = rate, salt

    def call(self, x, training=False, seed=None):
        if not training or not self.rate:
            return x
        if seed is None:  # Outside the training loop: a fresh draw.
            seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
        seed = draws.fold_in(seed, self.salt)  # Each layer its own mask.
        return draws.dropout(x, self.rate, seed)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "salt": self.salt}


def _conv(name, filters, kernel, stride, padding, std):
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, **_init(name, std))


def _init(name, std):
    return dict(
        name=name,
        # §3.1: ReLU after every conv and fc layer but the last; conv1's and conv2's runs in the LRN layer after
        # them, in the same loop (model/lrn.py).
        activation=None if name[:-2] in NORMALIZED else "relu",
        kernel_initializer=keras.initializers.RandomNormal(stddev=std),
        bias_initializer="ones" if name[:-2] in ONE_BIAS else "zeros",
    )


@keras.saving.register_keras_serializable(package=model.PACKAGE)
class AlexNet(keras.Model):
    """Mean-subtracted float images (B, S, S, 3) -> logits (B, num_classes); the paper's S is 224."""

    def __init__(self, num_classes=1000, *, tower_devices=None, dropout=DROPOUT, weight_std=WEIGHT_STD, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.tower_devices = num_classes, tuple(tower_devices) if tower_devices else None
        self.dropout_rate, self.weight_std = dropout, weight_std
        for name, filters, kernel, stride, padding in CONVS:  # Weights in the paper's order, tower a first.
            for t in "ab":
                setattr(self, f"{name}_{t}", _conv(f"{name}_{t}", filters, kernel, stride, padding, weight_std))
        for name, units in FCS:
            for t in "ab":
                setattr(self, f"{name}_{t}", keras.layers.Dense(units, **_init(f"{name}_{t}", weight_std)))
        for t in "ab":
            for i in (1, 2):
                setattr(self, f"lrn{i}_{t}", LocalResponseNorm(name=f"lrn{i}_{t}"))
            for i in (1, 2, 5):  # §3.4: overlapping pooling, z=3, s=2.
                setattr(self, f"pool{i}_{t}", keras.layers.MaxPooling2D(3, 2, name=f"pool{i}_{t}"))
            for salt, i in enumerate((6, 7)):  # Each dropout layer draws its own masks from the step's seed.
                salt = 2 * salt + "ab".index(t)
                setattr(self, f"dropout{i}_{t}", Dropout(dropout, salt=salt, name=f"dropout{i}_{t}"))
        self.flatten = keras.layers.Flatten(name="flatten")
        self.fc8 = keras.layers.Dense(
            num_classes,
            name="fc8",
            dtype="float32",  # Logits and softmax in float32 under mixed precision.
            kernel_initializer=keras.initializers.RandomNormal(stddev=weight_std),
        )
        if self.tower_devices:
            for layer in self._flatten_layers(include_self=False, recursive=False):
                if layer.name.endswith(("_a", "_b")) or layer is self.fc8:
                    placement.place(layer, self.tower_devices[layer.name.endswith("_b")])

    def build(self, input_shape):
        # Each layer creates its variables on its first call, on its tower's device if placed (a symbolic call
        # would defer them to outside the device scope).
        self.call(tf.zeros((1, *input_shape[1:])))

    def call(self, images, training=False, seed=None):
        """Figure 2, bottom to top (below: up to fc7), then fc8. `seed` (a stateless seed, shape [2]) draws the
        dropout masks in training."""
        return self.fc8(self.features(images, training=training, seed=seed))

    def features(self, images, training=False, seed=None):
        """fc7's output, both towers' 2048 units: the feature vectors §6.1 compares images by."""
        x = tf.pad(images, CONV1_PAD)
        a = self.pool1_a(self.lrn1_a(self.conv1_a(x)))
        b = self.pool1_b(self.lrn1_b(self.conv1_b(x)))
        a = self.pool2_a(self.lrn2_a(self.conv2_a(a)))  # conv2, conv4, conv5: own tower only.
        b = self.pool2_b(self.lrn2_b(self.conv2_b(b)))
        x = tf.concat([a, b], axis=-1)  # conv3: both towers.
        a = self.pool5_a(self.conv5_a(self.conv4_a(self.conv3_a(x))))
        b = self.pool5_b(self.conv5_b(self.conv4_b(self.conv3_b(x))))
        x = tf.concat([self.flatten(a), self.flatten(b)], axis=-1)  # fc6, fc7, fc8: all of the previous layer.
        a = self.dropout6_a(self.fc6_a(x), training=training, seed=seed)
        b = self.dropout6_b(self.fc6_b(x), training=training, seed=seed)
        x = tf.concat([a, b], axis=-1)
        a = self.dropout7_a(self.fc7_a(x), training=training, seed=seed)
        b = self.dropout7_b(self.fc7_b(x), training=training, seed=seed)
        return tf.concat([a, b], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "tower_devices": self.tower_devices,
            "dropout": self.dropout_rate,
            "weight_std": self.weight_std,
        }


def build_alexnet(num_classes=1000, *, input_size=224, **kwargs):
    """The paper's AlexNet with its variables created (on the tower devices, if given)."""
    model = AlexNet(num_classes, name="alexnet", **kwargs)
    model(tf.zeros((1, input_size, input_size, 3)))
    return model
