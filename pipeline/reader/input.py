"""The tf.data reader: TFRecord shards -> uint8 image batches and labels, ready for on-device augmentation.

All per-image work on the host is parsing and JPEG decoding (at a reduced size, libjpeg's DCT scaling is nearly
free); crops, flips and lighting run on the accelerator (model/augment.py).

Training order: each epoch's order is a function of (seed, epoch) alone. The shards are permuted, dealt to the
input pipelines (one per worker, each reading its own shards), and read GROUP_SHARDS at a time; each group's
records are shuffled together, as serialized records, before decoding. A position inside an epoch is therefore a
group and an offset in it: a resumed run never opens the groups before it, and skips the records before the
offset without decoding them.
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

from pipeline import example_spec

GROUP_SHARDS = 8  # Shards read and shuffled together: ~10,000 ImageNet images, ~200 MB of JPEGs.
SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})$")


def _read_json(data_dir, name):
    path = os.path.join(data_dir, name)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: --data_dir must be the output of `python -m pipeline.build_tfrecords` "
            "(a conversion that did not finish writes no summary.json: run it again)"
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


SUMMARY_KEYS = ("image_size", "classes", "train", "validation")


def load_summary(data_dir):
    """summary.json of the conversion: the records' size, the classes, image counts and images per shard."""
    summary = _read_json(data_dir, "summary.json")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    missing += [f"{s}.shard_sizes" for s in ("train", "validation") if "shard_sizes" not in summary.get(s, {})]
    if missing:
        raise ValueError(
            f"{os.path.join(data_dir, 'summary.json')} lacks {', '.join(missing)}: not written by this version of "
            "`python -m pipeline.build_tfrecords`; run it again"
        )
    return summary


def load_stats(data_dir):
    """stats.npz: mean_image (256x256x3), eigenvalues (3,) descending, eigenvectors (3x3, columns)."""
    path = os.path.join(data_dir, "stats.npz")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m pipeline.build_tfrecords` again")
    with tf.io.gfile.GFile(path, "rb") as f:
        stats = np.load(f)
        return {k: stats[k] for k in ("mean_image", "eigenvalues", "eigenvectors")}


def load_labels(data_dir):
    """labels.txt: line i is label i's wnid, then optionally a tab and the class's name. Returns [(wnid, name)]."""
    path = os.path.join(data_dir, "labels.txt")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python -m pipeline.build_tfrecords` again")
    with tf.io.gfile.GFile(path) as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    return [(row[0], row[1] if len(row) > 1 else row[0]) for row in rows]


def resize_mean_image(mean_image, image_size):
    """The mean image at the size images are decoded to (area averaging, as DCT downscaling roughly does)."""
    if mean_image.shape[0] == image_size:
        return mean_image
    return tf.image.resize(mean_image, (image_size, image_size), method="area").numpy()


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


def shard_sizes(files, summary, split):
    """Images per shard, as summary.json lists them."""
    sizes = summary[split]["shard_sizes"]
    if len(sizes) != len(files):
        raise ValueError(f"summary.json lists {len(sizes)} {split} shards, the folder holds {len(files)}")
    return np.asarray(sizes, np.int64)


def decode(serialized, image_size=example_spec.IMAGE_SIZE):
    """One Example -> (uint8 image_size x image_size x 3, int32 label)."""
    features = example_spec.parse_example(serialized)
    ratio = example_spec.IMAGE_SIZE // image_size
    image = tf.io.decode_jpeg(features[example_spec.ENCODED], channels=3, ratio=ratio)
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    return image, tf.cast(features[example_spec.LABEL], tf.int32)


def check_image_size(image_size):
    if example_spec.IMAGE_SIZE % image_size or example_spec.IMAGE_SIZE // image_size not in (1, 2, 4, 8):
        raise ValueError(f"--image_size={image_size}: must be 256, 128, 64 or 32 (JPEG DCT scaling of the 256 records)")


def epoch_plan(sizes, *, seed, epoch, step_size, pipeline=0, pipelines=1):
    """(groups of shard indices this pipeline reads in order, steps of the epoch), `step_size` images per step
    and pipeline.

    Every pipeline takes the same number of steps (a step is a collective): as many as the pipeline with the
    fewest images fills. The images beyond them are left out of this epoch only: the permutation changes with
    each epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    steps = min(int(sizes[order[p::pipelines]].sum()) // step_size for p in range(pipelines))
    mine = [i for i in order[pipeline::pipelines] if sizes[i]]
    return [mine[i : i + GROUP_SHARDS] for i in range(0, len(mine), GROUP_SHARDS)], steps


def group_seed(seed, epoch, group):
    return tf.random.experimental.stateless_fold_in(tf.random.experimental.stateless_fold_in([seed, 0], epoch), group)


def _shuffled_group(group, files, seed, epoch):
    """The serialized records of a group of shards, in a random order drawn from (seed, epoch, group)."""
    records = tf.data.TFRecordDataset(files, num_parallel_reads=GROUP_SHARDS).batch(2**31 - 1).get_single_element()
    return tf.random.experimental.stateless_shuffle(records, group_seed(seed, epoch, group))


def train_dataset(
    files,
    sizes,
    *,
    seed,
    epoch,
    batch_size,
    replicas=1,
    image_size=example_spec.IMAGE_SIZE,
    pipeline=0,
    pipelines=1,
    skip_steps=0,
    deterministic=True,
):
    """Epoch `epoch` of the training set for one input pipeline: batches of (uint8 images, int32 labels) of
    `batch_size` (per replica), `replicas` batches a step, the first `skip_steps` steps left out. Decoding runs
    in parallel, in order when `deterministic`."""
    step_size = batch_size * replicas
    plan = dict(seed=seed, epoch=epoch, step_size=step_size, pipeline=pipeline, pipelines=pipelines)
    groups, steps = epoch_plan(sizes, **plan)
    skip, first = skip_steps * step_size, 0
    while first < len(groups) and sizes[groups[first]].sum() <= skip:  # Whole groups: never opened.
        skip -= int(sizes[groups[first]].sum())
        first += 1
    names = tf.ragged.constant([[files[i] for i in group] for group in groups[first:]], dtype=tf.string)
    ds = tf.data.Dataset.from_tensor_slices((tf.range(first, len(groups)), names))
    ds = ds.map(lambda group, names: _shuffled_group(group, names, seed, epoch)).prefetch(1)
    ds = ds.flat_map(tf.data.Dataset.from_tensor_slices)
    ds = ds.skip(skip)  # Serialized records: read, not decoded.
    ds = ds.map(lambda r: decode(r, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.take((steps - skip_steps) * replicas).prefetch(tf.data.AUTOTUNE)


def service_dataset(files, sizes, *, seed, batch_size, data_service, job, replicas=1, image_size=256):
    """The training set through a tf.data service: an endless stream of passes over it, each pass's shards
    permuted by (seed, pass) and read GROUP_SHARDS at a time as the reader does, as batches of (uint8 images, int32
    labels, int64 passes: the pass each image is of) of `batch_size`. Every consumer naming `job` shares the one
    stream (the workers of one run; a resumed run rejoins it), and the service's workers take its groups as they
    become free ("distributed_epoch"): each image at most once a pass, whatever the number of workers.

    The job never ends, so an epoch is what the trainer reads of it (the planned steps): TensorFlow ends a finite
    job only when every task has, and the task of a worker that never comes back never does; a worker added later
    takes its share of the stream. What a lost worker held is missed once, and counted by pass. The order depends
    on the workers' timing."""
    shards = [i for i in range(len(sizes)) if sizes[i]]
    names = tf.constant([files[i] for i in shards])
    groups = -(-len(shards) // GROUP_SHARDS)

    def group(index):
        """The records of the index-th group of the stream, shuffled, with their pass."""
        this_pass, number = index // groups, index % groups
        order = tf.random.experimental.stateless_shuffle(tf.range(len(shards)), pass_seed(seed, this_pass))
        records = _shuffled_group(
            number, tf.gather(names, order[number * GROUP_SHARDS :][:GROUP_SHARDS]), seed, this_pass
        )
        return tf.data.Dataset.from_tensor_slices((records, tf.fill(tf.shape(records), this_pass)))

    ds = tf.data.Dataset.range(2**62).flat_map(group)  # Each element of the range is a split the service deals.
    ds = ds.map(lambda r, p: (*decode(r, image_size), p), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.apply(
        tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
            service=data_service,
            job_name=job,
            # Decoded pixels barely compress, and compressing them cost more than sending them
            # (docs/benchmarks.md, "Input pipeline").
            compression=None,
            # Also this consumer's prefetch buffer, and what it holds when its trainer stops: 4 steps' worth.
            max_outstanding_requests=4 * replicas,
        )
    )


def pass_seed(seed, this_pass):
    return tf.random.experimental.stateless_fold_in(tf.convert_to_tensor([seed, 1], tf.int64), this_pass)


def eval_steps(sizes, step_size, pipelines=1):
    """Steps for every pipeline to see all of its images: the same on each (the short ones pad)."""
    return max(-(-int(sizes[p::pipelines].sum()) // step_size) for p in range(pipelines))


def eval_dataset(files, sizes, *, batch_size, replicas=1, image_size=example_spec.IMAGE_SIZE, pipeline=0, pipelines=1):
    """Every image of the split once, in shard order, as batches of (uint8 images, int32 labels, bool valid): the
    last batches padded with invalid blanks, so every batch (and every replica's share) is whole."""
    batches = eval_steps(sizes, batch_size * replicas, pipelines) * replicas
    mine = files[pipeline::pipelines]
    ds = tf.data.TFRecordDataset(mine, num_parallel_reads=min(16, max(1, len(mine))))
    ds = ds.map(lambda r: (*decode(r, image_size), True), num_parallel_calls=tf.data.AUTOTUNE)
    blank = (tf.zeros((image_size, image_size, 3), tf.uint8), tf.constant(0, tf.int32), False)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat())
    return ds.batch(batch_size, drop_remainder=True).take(batches).prefetch(tf.data.AUTOTUNE)
