"""Listing raw ImageNet (ILSVRC-2012 layout) through Beam's file systems, so local paths and gs:// work alike.

    <input_dir>/train/<wnid>/*.JPEG
    <input_dir>/val/<wnid>/*.JPEG                          (class folders), or
    <input_dir>/val/ILSVRC2012_val_<8 digits>.JPEG         (flat, labelled by a validation labels file)

A validation labels file has one wnid per line, line i for image number i (tensorflow-datasets' format).
Labels are 0-based in sorted-wnid order of the training class folders.
"""

import importlib.util
import os
import re

from apache_beam.io.filesystems import FileSystems

VAL_FILE_RE = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
TFDS_VAL_LABELS = ("datasets", "imagenet2012", "validation_labels.txt")


def wnid_of(path):
    """The class folder a file sits in."""
    return path.replace("\\", "/").rstrip("/").split("/")[-2]


def train_pattern(input_dir):
    return FileSystems.join(input_dir, "train", "*", "*")


def match(pattern):
    """Sorted paths of the files matching pattern (an empty list when none)."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def tfds_val_labels_file():
    """Path of the ILSVRC-2012 validation labels shipped by tensorflow-datasets, or None if it is absent."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], *TFDS_VAL_LABELS)
    return path if os.path.exists(path) else None


def read_val_labels(path):
    """{image number (1-based): wnid} from a validation labels file."""
    with FileSystems.open(path) as f:
        lines = f.read().decode().split()
    return {i: wnid for i, wnid in enumerate(lines, start=1)}


def val_wnid(path, val_labels):
    """The wnid of a flat val/ file, by its number in the labels file; None if it has none."""
    number = VAL_FILE_RE.search(path)
    if val_labels is None or not number:
        return None
    return val_labels.get(int(number.group(1)))


def resolve_val_labels(input_dir, val_labels_file=None):
    """The labels file for a flat val/ folder: the one given, else one beside the data, else tensorflow-datasets'."""
    if val_labels_file:
        if not FileSystems.exists(val_labels_file):
            raise FileNotFoundError(f"--val_labels_file={val_labels_file} does not exist")
        return val_labels_file
    beside = FileSystems.join(input_dir, "validation_labels.txt")
    return beside if FileSystems.exists(beside) else tfds_val_labels_file()
