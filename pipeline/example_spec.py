"""The one tf.train.Example layout, shared by the Beam writer and the tf.data reader.

Keys are those of TensorFlow's inception/ImageNet converter (`build_imagenet_data.py`), but labels differ: here
they are 0-based in sorted-wnid order (label 0 is the first line of labels.txt), there 1-based (0 is its
"background" class). A reader written for the Inception records that subtracts 1 gets every label wrong by one.
The same layout described for tensorflow-datasets (`tfds_features`) lets `tfds.builder_from_directory` read the
shards as they are.
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


def tfds_features(wnids):
    """The layout as tensorflow-datasets features: TFDS joins nested names with '/', so {"image": {"encoded": ..}}
    reads the key image/encoded. The label is a ClassLabel whose names are the wnids, in label order."""
    import tensorflow_datasets as tfds

    text, integer = tfds.features.Text, lambda: tfds.features.Scalar(tf.int64)
    image = tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg")
    label = tfds.features.ClassLabel(names=list(wnids))
    fields = {"encoded": image, "format": text(), "height": integer(), "width": integer(), "filename": text()}
    return {"image": {**fields, "class": {"label": label, "synset": text()}}}


def parse_example(serialized):
    """Parses one serialized Example into a dict of tensors (eager or inside tf.data)."""
    return tf.io.parse_single_example(serialized, FEATURES)
