"""The network as training, evaluation and serving see it: uint8 images in, logits out."""

import keras
import tensorflow as tf

import model
from model import augment
from model.alexnet import build_alexnet


@keras.saving.register_keras_serializable(package=model.PACKAGE)
class Classifier(keras.Model):
    """uint8 (B, S, S, 3) -> logits: on-device preprocessing (§2, §4.1), then the AlexNet (§3).

    Saved whole in Keras' format (`.keras`: its parts' settings and every weight, the statistics included) and
    loaded by `keras.saving.load_model` once this package is imported (it registers the layers)."""

    def __init__(self, preprocess, net, **kwargs):
        super().__init__(**kwargs)
        self.preprocess, self.net = preprocess, net

    def build(self, input_shape):
        self.call(tf.zeros((1, *input_shape[1:]), tf.uint8))  # Every part's variables, at their shapes.

    def get_config(self):
        parts = {"preprocess": self.preprocess, "net": self.net}
        return {**super().get_config(), **{k: keras.saving.serialize_keras_object(v) for k, v in parts.items()}}

    @classmethod
    def from_config(cls, config):
        parts = {k: keras.saving.deserialize_keras_object(config.pop(k)) for k in ("preprocess", "net")}
        return cls(**parts, **config)

    def call(self, images, training=False, seed=None):
        preprocess_seed, net_seed = augment.split_seed(seed, 2) if training else (None, None)
        x = self.preprocess(images, training=training, seed=preprocess_seed)
        return self.net(x, training=training, seed=net_seed)


def build_classifier(num_classes, stats, *, image_size, crop_size, lighting_std, precision="float32", **net_kwargs):
    """The Classifier with its statistics set; `precision` is a Keras dtype policy for the AlexNet."""
    preprocess = augment.Preprocess(image_size, crop_size, lighting_std, name="preprocess")
    preprocess.set_statistics(stats["mean_image"], stats["eigenvalues"], stats["eigenvectors"])
    keras.mixed_precision.set_global_policy(precision)
    try:
        net = build_alexnet(num_classes, input_size=crop_size, **net_kwargs)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model = Classifier(preprocess, net, name="classifier")
    model(tf.zeros((1, image_size, image_size, 3), tf.uint8))
    return model


def probabilities(model, images, crops):
    """Softmax probabilities of uint8 images: of the centre crop, or averaged over §4.1's ten patches."""
    if crops == 1:
        return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))
    x = model.preprocess.normalize(images)
    size, total = model.preprocess.crop_size, None
    for crop in augment.ten_crop_makers(x.shape[1], x.shape[2], size):
        # One patch and its forward pass at a time, each after the one before: ten at once would hold ten
        # networks' activations (a graph runs what is ready, as many as it has threads).
        with tf.control_dependencies([] if total is None else [total]):
            probs = tf.nn.softmax(tf.cast(model.net(crop(x), training=False), tf.float32))
        total = probs if total is None else total + probs
    return total / 10
