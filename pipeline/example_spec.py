"""The one tf.train.Example layout, shared by the Beam writer and the tf.data reader.

Keys are those of TensorFlow's inception/ImageNet converter; labels are 0-based in sorted-wnid order.
"""

import tensorflow as tf

IMAGE_SIZE = 256  # §2: shorter side to 256, then the central 256x256 patch.

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
LABEL = "image/class/label"
SYNSET = "image/class/synset"
FILENAME = "image/filename"

FEATURES = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    FORMAT: tf.io.FixedLenFeature([], tf.string, default_value="JPEG"),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    SYNSET: tf.io.FixedLenFeature([], tf.string),
    FILENAME: tf.io.FixedLenFeature([], tf.string),
}


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(*, jpeg, height, width, label, synset, filename):
    """Serialized Example for one converted image."""
    feature = {
        ENCODED: _bytes(jpeg),
        FORMAT: _bytes(b"JPEG"),
        HEIGHT: _int64(height),
        WIDTH: _int64(width),
        LABEL: _int64(label),
        SYNSET: _bytes(synset.encode()),
        FILENAME: _bytes(filename.encode()),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)  # Map order fixed: the same bytes in every process.


def parse_example(serialized):
    """Parses one serialized Example into a dict of tensors (eager or inside tf.data)."""
    return tf.io.parse_single_example(serialized, FEATURES)
