"""The converted folder as training reads it: every file there, checked against the others, loaded into one Data.

A folder that is not a whole conversion is refused (FolderError) with the file that is wrong and what to do."""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from pipeline import example_spec
from pipeline.reader import input as data_input

SPLITS = ("train", "validation")


class FolderError(ValueError):
    """A data folder that training cannot read; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class Data:
    files: dict  # split -> shard paths
    sizes: dict  # split -> images per shard (np.int64)
    stats: dict  # mean_image (at the decode size), eigenvalues, eigenvectors
    labels: list  # [(wnid, name)] in label order


def load(data_dir, image_size=example_spec.IMAGE_SIZE):
    """The data in data_dir, checked: every file there, statistics of the records' size, labels that agree with
    summary.json and with the records; the mean image at image_size."""
    try:
        summary = data_input.load_summary(data_dir)
        stats = data_input.load_stats(data_dir)
        labels = data_input.load_labels(data_dir)
        files = {split: data_input.shard_files(data_dir, split) for split in SPLITS}
        sizes = {split: data_input.shard_sizes(files[split], summary, split) for split in files}
    except (FileNotFoundError, ValueError) as e:
        raise FolderError(f"--data_dir={data_dir}: {e}") from None
    for split in files:
        if sizes[split].sum() == 0:
            raise FolderError(f"--data_dir={data_dir}: the {split} split has no images; convert a dataset that has")
    size = summary["image_size"]
    if stats["mean_image"].shape != (size, size, 3):
        raise FolderError(
            f"{os.path.join(data_dir, 'stats.npz')}: its mean image is {stats['mean_image'].shape[:2]}, the records "
            f"are {size}x{size}: the statistics belong to another conversion; run build_tfrecords again"
        )
    if len(labels) != summary["classes"]:
        raise FolderError(
            f"--data_dir={data_dir}: labels.txt lists {len(labels)} classes, summary.json {summary['classes']}: "
            "the files come from different conversions; run build_tfrecords again"
        )
    check_record_labels(files, labels)
    stats = dict(stats, mean_image=data_input.resize_mean_image(stats["mean_image"], image_size))
    return Data(files, sizes, stats, labels)


def check_record_labels(files, labels):
    """The first record of every shard carries a label and wnid that labels.txt agrees with (read in parallel:
    ImageNet has 1,152 shards, maybe on an object store)."""
    paths = [path for split in files.values() for path in split]
    firsts = tf.data.Dataset.from_tensor_slices(paths).interleave(
        lambda path: tf.data.TFRecordDataset(path).take(1).map(lambda record: (path, record)),
        cycle_length=32,
        num_parallel_calls=32,
    )
    for path, record in firsts:
        features = example_spec.parse_example(record)
        label, wnid = int(features[example_spec.LABEL]), features[example_spec.SYNSET].numpy().decode()
        if not 0 <= label < len(labels) or labels[label][0] != wnid:
            owner = labels[label][0] if 0 <= label < len(labels) else "no class"
            raise FolderError(
                f"{path.numpy().decode()}: a record of {wnid} has label {label}, but labels.txt gives that label to "
                f"{owner}: shards and labels.txt come from different conversions; run build_tfrecords again"
            )


def stand_in_stats(image_size):
    """Statistics of the right shapes for a model whose checkpoint brings its own (the run's)."""
    return {"mean_image": np.zeros((image_size, image_size, 3)), "eigenvalues": np.zeros(3), "eigenvectors": np.eye(3)}
