"""The tf.data reader: TFRecord shards -> uint8 image batches and labels, ready for on-device augmentation.

All per-image work on the host is parsing and JPEG decoding; crops, flips and lighting run on the accelerator
(model/augment.py). Decoding at a reduced size uses libjpeg's DCT scaling (`ratio`), nearly free.
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

from pipeline import example_spec

SHUFFLE_BUFFER = 10_000
SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})$")


def shard_files(data_dir, split):
    """The split's shards, checked complete: every SSSSS of -of-NNNNN present once."""
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{split}-*-of-*")))
    if not files:
        raise FileNotFoundError(
            f"no {split}-*-of-* shards in --data_dir={data_dir}: run `python -m pipeline.build_tfrecords` first"
        )
    total = {int(SHARD_RE.search(f).group(2)) for f in files}
    if len(total) != 1 or len(files) != total.pop():
        raise ValueError(f"{data_dir}: {split} shards are incomplete or from two runs; rerun the conversion")
    return files


def load_summary(data_dir):
    """summary.json of the conversion: image counts per split."""
    with tf.io.gfile.GFile(os.path.join(data_dir, "summary.json")) as f:
        return json.load(f)


def load_stats(data_dir):
    """stats.npz: mean_image (256x256x3), eigenvalues (3,) descending, eigenvectors (3x3, columns)."""
    with tf.io.gfile.GFile(os.path.join(data_dir, "stats.npz"), "rb") as f:
        stats = np.load(f)
        return {k: stats[k] for k in ("mean_image", "eigenvalues", "eigenvectors")}


def resize_mean_image(mean_image, image_size):
    """The mean image at the size images are decoded to (area averaging, as DCT downscaling roughly does)."""
    if mean_image.shape[0] == image_size:
        return mean_image
    return tf.image.resize(mean_image, (image_size, image_size), method="area").numpy()


def decode(serialized, image_size=example_spec.IMAGE_SIZE):
    """One Example -> (uint8 image_size x image_size x 3, int32 label)."""
    features = example_spec.parse_example(serialized)
    ratio = example_spec.IMAGE_SIZE // image_size
    image = tf.io.decode_jpeg(features[example_spec.ENCODED], channels=3, ratio=ratio)
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    return image, tf.cast(features[example_spec.LABEL], tf.int32)


def dataset(
    data_dir, split, *, batch_size, training, image_size=example_spec.IMAGE_SIZE, seed=None, whole_batches=None
):
    """Batches of (uint8 images, labels); training data is shuffled and repeats forever.

    whole_batches (default: when training) drops a final partial batch.
    """
    if example_spec.IMAGE_SIZE % image_size or example_spec.IMAGE_SIZE // image_size not in (1, 2, 4, 8):
        raise ValueError(f"image_size={image_size}: must be 256, 128, 64 or 32 (JPEG DCT scaling)")
    files = shard_files(data_dir, split)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not training,
    )
    if training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed)
    ds = ds.map(lambda s: decode(s, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    whole_batches = training if whole_batches is None else whole_batches
    return ds.batch(batch_size, drop_remainder=whole_batches).prefetch(tf.data.AUTOTUNE)
