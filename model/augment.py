"""On-device preprocessing (§2, §4.1): uint8 batches in, mean-subtracted float crops out.

Training: subtract the mean image, add PCA lighting, take a random crop and mirror it at random, each drawn per
image. Inference: the central crop, or the ten crops of §4.1 (`ten_crops`). Random draws are stateless functions
of a seed (shape [2]) that the training loop derives from the run's seed, the step and the replica, so each
replica draws its own and a resumed run draws what the uninterrupted one would have.
"""

import keras
import numpy as np
import tensorflow as tf

import model
from model import draws

CROP_SIZE = 224
LIGHTING_STD = 0.1  # §4.1: alpha_i ~ N(0, 0.1).


def split_seed(seed, n):
    """n independent stateless seeds from one; from a fresh random draw when seed is None."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    return draws.split(seed, n)


def crop_and_flip(images, top, left, flip, size):
    """Per-image crops images[b, top[b]:top[b]+size, left[b]:left[b]+size], mirrored where flip[b]."""
    rows = top[:, None] + tf.range(size)[None, :]
    cols = left[:, None] + tf.range(size)[None, :]
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
    return tf.gather(tf.gather(images, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def random_crop_and_flip(images, size, seed):
    """§4.1: a random size x size patch (all S - size + 1 offsets per axis) and its mirror image at random."""
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    top_seed, left_seed, flip_seed = split_seed(seed, 3)
    top = draws.integers([batch], top_seed, height - size + 1)
    left = draws.integers([batch], left_seed, width - size + 1)
    flip = draws.uniform([batch], flip_seed) < 0.5
    return crop_and_flip(images, top, left, flip, size)


def ten_crops(images, size):
    """§4.1's test patches: four corners and the centre, then their mirror images."""
    return [patch(images) for patch in ten_crop_makers(images.shape[1], images.shape[2], size)]


def ten_crop_makers(height, width, size):
    """§4.1's ten test patches as functions of the images, each making its patch when called (so that a caller
    can make each when it needs it)."""
    offsets = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
    offsets.append(((height - size) // 2, (width - size) // 2))

    def maker(y, x, mirror):
        def crop(images):
            patch = images[:, y : y + size, x : x + size]
            return tf.reverse(patch, axis=[2]) if mirror else patch

        return crop

    return [maker(y, x, mirror) for mirror in (False, True) for y, x in offsets]


def lighting_offsets(batch, eigenvalues, eigenvectors, std, seed):
    """§4.1: per image, [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T with a_i ~ N(0, std), eigenvectors as columns.

    l_i = sqrt(eigenvalue_i) of the 0..255 covariance, as Krizhevsky's cuda-convnet2 does: alpha then scales the
    standard deviation along each principal component. (The eigenvalue itself, a variance, is in squared pixel
    units: it cannot be added to pixels.)
    """
    alphas = draws.normal([batch, 3], seed, stddev=std)
    return tf.linalg.matvec(eigenvectors, alphas * tf.sqrt(tf.maximum(eigenvalues, 0.0)))


@keras.saving.register_keras_serializable(package=model.PACKAGE)
class Preprocess(keras.layers.Layer):
    """uint8 (B, S, S, 3) -> float32 (B, crop, crop, 3): random crop, flip and lighting in training, centre crop else.

    The mean image and the RGB PCA are non-trainable weights, so checkpoints carry the statistics they were
    trained with.
    """

    def __init__(self, image_size=256, crop_size=CROP_SIZE, lighting_std=LIGHTING_STD, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.image_size, self.crop_size, self.lighting_std = image_size, crop_size, lighting_std
        s = image_size
        self.mean_image = self.add_weight(shape=(s, s, 3), initializer="zeros", trainable=False, name="mean_image")
        self.eigenvalues = self.add_weight(shape=(3,), initializer="zeros", trainable=False, name="eigenvalues")
        self.eigenvectors = self.add_weight(shape=(3, 3), initializer="zeros", trainable=False, name="eigenvectors")

    def set_statistics(self, mean_image, eigenvalues, eigenvectors):
        self.mean_image.assign(np.asarray(mean_image, np.float32))
        self.eigenvalues.assign(np.asarray(eigenvalues, np.float32))
        self.eigenvectors.assign(np.asarray(eigenvectors, np.float32))

    def normalize(self, images):
        """§2: subtract the mean image (the only preprocessing besides the crop)."""
        return tf.cast(images, tf.float32) - self.mean_image

    def call(self, images, training=False, seed=None):
        x = self.normalize(images)
        if not training:
            offset = (self.image_size - self.crop_size) // 2
            return x[:, offset : offset + self.crop_size, offset : offset + self.crop_size]
        lighting_seed, crop_seed = split_seed(seed, 2)
        if self.lighting_std:
            pca = (self.eigenvalues, self.eigenvectors, self.lighting_std)
            x += lighting_offsets(tf.shape(x)[0], *pca, lighting_seed)[:, None, None]
        return random_crop_and_flip(x, self.crop_size, crop_seed)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.crop_size, self.crop_size, 3)

    def get_config(self):
        config = super().get_config()
        config.update(image_size=self.image_size, crop_size=self.crop_size, lighting_std=self.lighting_std)
        return config
