r"""Figure 4 (§6.1): for query images, the six training images whose fc7 activations are nearest.

    python -m tools.neighbours --model_dir=RUN [--data_dir=DATA] (--images=A.jpg,B.png | --validation_images=N)
                               [--k=6] [--output=FILE.png] [--checkpoint=latest|best|PATH]

Writes one PNG (a row per query: the query, then its neighbours, nearest first) and the same image to
TensorBoard (RUN/neighbours), and prints each query's neighbours with their classes and distances.
"""

import os
import sys
import time

import tensorflow as tf
from absl import app, flags

from pipeline.reader import input as data_input
from tools import similarity
from training import checkpoints

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The run's folder (train.py's --model_dir).", required=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Converted data whose training images are searched; default: the run's."
)
_IMAGES = flags.DEFINE_list("images", [], "Query image files (JPEG, PNG, ...).")
_VALIDATION_IMAGES = flags.DEFINE_integer("validation_images", 0, "Or: the first N validation images as queries.")
_K = flags.DEFINE_integer("k", 6, "Neighbours per query (Figure 4: 6).", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "The PNG; default RUN/neighbours.png.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a checkpoint path.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training images per step of the search.")


def queries(data_dir, image_size):
    """(uint8 query images, their descriptions) from --images or the first --validation_images."""
    if _IMAGES.value:
        return similarity.images_from_files(_IMAGES.value, image_size), list(_IMAGES.value)
    files = data_input.shard_files(data_dir, "validation")
    sizes = data_input.shard_sizes(files, data_input.load_summary(data_dir), "validation")
    dataset = data_input.eval_dataset(files, sizes, batch_size=_VALIDATION_IMAGES.value, image_size=image_size)
    images, labels, valid = next(iter(dataset))
    names = data_input.load_labels(data_dir)
    return images[valid], [f"validation image {i + 1} ({names[int(y)][1]})" for i, y in enumerate(labels[valid])]


def main(argv):
    del argv
    if bool(_IMAGES.value) == bool(_VALIDATION_IMAGES.value):
        raise app.UsageError("give query images: --images=A.jpg,B.png or --validation_images=N (one of them)")
    try:
        model, settings, labels, path = checkpoints.restore_classifier(_MODEL_DIR.value, _CHECKPOINT.value)
        data_dir = _DATA_DIR.value or settings["data_dir"]
        images, described = queries(data_dir, settings["image_size"])
        files = data_input.shard_files(data_dir, "train")
        sizes = data_input.shard_sizes(files, data_input.load_summary(data_dir), "train")
    except (FileNotFoundError, ValueError, tf.errors.OpError) as e:
        sys.exit(f"tools.neighbours: {e}")
    start = time.perf_counter()
    distances, neighbours, classes = similarity.nearest(
        model, images, files, sizes, k=_K.value, batch_size=_BATCH_SIZE.value
    )
    seconds = time.perf_counter() - start
    picture = similarity.figure_4(images, neighbours)
    output = _OUTPUT.value or os.path.join(_MODEL_DIR.value, "neighbours.png")
    tf.io.write_file(output, tf.io.encode_png(tf.cast(tf.round(picture[0] * 255), tf.uint8)))
    with tf.summary.create_file_writer(os.path.join(_MODEL_DIR.value, "neighbours")).as_default(step=0):
        tf.summary.image("figure_4", picture)
    for query, row_distances, row_classes in zip(described, distances.numpy(), classes.numpy(), strict=True):
        found = ", ".join(f"{labels[c][1]} ({d**0.5:.1f})" for c, d in zip(row_classes, row_distances, strict=True))
        print(f"{query}: {found}")
    print(
        f"Wrote {output}: {len(described)} queries x {_K.value} neighbours among {int(sizes.sum())} training images "
        f"({path}), searched in {seconds:.1f} s ({sizes.sum() / seconds:.0f} images/s)"
    )


if __name__ == "__main__":
    app.run(main)
