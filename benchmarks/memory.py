r"""Peak memory of a training step, of the 10-crop evaluation and of the training reader at the paper's shapes, and
where it goes.

    python benchmarks/memory.py [--batch_size=128] [--classes=1000] [--precision=float32]
                                [--records_per_shard=1251] [--photos='GLOB']

Each part runs in a fresh process (the paper's network, random weights, synthetic batches; the reader on records
written as the converter writes them, 8 shards of ImageNet's ~1,251 records, made from --photos or the demo's
drawings) and prints its resident memory: what the process holds before (TensorFlow, the weights, the momentum),
and the peak above it during the part (activations, gradients, the evaluation's crops, the reader's buffers),
read from /proc/self/status after resetting the peak. On a GPU the training step's and the evaluation's figures
are what the accelerator holds; the reader's are the host's. Linux only (/proc).
"""

import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import records  # benchmarks/records.py, beside this script.
import tensorflow as tf
from absl import app, flags

from pipeline.reader import input as data_input
from training import evaluation, recipe
from training import step as train_step

_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step (§5: 128).")
_CLASSES = flags.DEFINE_integer("classes", 1000, "Classes of the network.")
_PRECISION = flags.DEFINE_enum("precision", "float32", list(recipe.PRECISIONS), "Keras dtype policy.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Decode size.")
_CROP_SIZE = flags.DEFINE_integer("crop_size", 224, "Training crop.")
_RECORDS = flags.DEFINE_integer("records_per_shard", 1251, "Records per shard (ImageNet's ~1,251).")
_PHOTOS = flags.DEFINE_string("photos", None, "Glob of real photos to crop the records from; default: drawings.")
_PART = flags.DEFINE_string("part", None, "Internal: measure this part in this process.")
_DATA = flags.DEFINE_string("data", None, "Internal: the records' folder.")

MB = 2**20


def _status_mb(field):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _config():
    size, crop = _IMAGE_SIZE.value, _CROP_SIZE.value
    return recipe.Config(batch_size=_BATCH.value, precision=_PRECISION.value, image_size=size, crop_size=crop)


def _model(config):
    stats = {"mean_image": np.full((config.image_size,) * 2 + (3,), 120.0), "eigenvalues": np.ones(3)}
    stats["eigenvectors"] = np.eye(3)
    return train_step.build_model(config, _CLASSES.value, stats)


def _batch(config, count):
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (count, config.image_size, config.image_size, 3), np.uint8))
    return images, tf.constant(rng.integers(0, _CLASSES.value, count), tf.int32)


def _peak_of(run, calls):
    """(resident MB before, the process's peak resident MB once run() has been called `calls` times): the first
    call traces and allocates; freed memory the allocator keeps counts as what the process needs."""
    before = _status_mb("VmRSS")
    for _ in range(calls):
        run()
    return before, _status_mb("VmHWM")


def runtime():
    """Resident MB of TensorFlow's runtime in this process, started by a small op."""
    tf.constant(1.0).numpy()
    return _status_mb("VmRSS")


def train_part():
    start = runtime()
    config = _config()
    strategy = tf.distribute.get_strategy()
    model, optimizer = _model(config)
    held = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in (*model.weights, *optimizer.variables))
    step = train_step.make_train_step(model, optimizer, strategy, config)
    batches = iter(tf.data.Dataset.from_tensors(_batch(config, config.batch_size)).repeat())
    built, peak = _peak_of(lambda: step(next(batches), tf.constant(0, tf.int64), tf.constant(0.0)).values(), 3)
    return {"runtime": start, "built": built, "peak": peak, "weights_and_momentum": held / MB}


def evaluate_part():
    start = runtime()
    config = _config()
    model, _ = _model(config)
    strategy = tf.distribute.get_strategy()
    replica_step = evaluation._eval_step(model, 10, _CLASSES.value)
    images, labels = _batch(config, config.batch_size)
    valid = tf.ones(config.batch_size, tf.bool)
    step = tf.function(lambda: strategy.run(replica_step, (images, labels, valid, tf.constant(0.0))))
    built, peak = _peak_of(lambda: step()["loss"].numpy(), 3)
    return {"runtime": start, "built": built, "peak": peak}


def reader_part():
    start = runtime()
    folder = _DATA.value
    files = data_input.shard_files(folder, "train")
    sizes = data_input.shard_sizes(files, data_input.load_summary(folder), "train")
    dataset = data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=_BATCH.value)
    _, peak = _peak_of(lambda: sum(1 for _ in dataset), 1)
    record_bytes = sum(os.path.getsize(f) for f in files)
    return {"runtime": start, "peak": peak, "group_mb": record_bytes / MB, "records": int(sizes.sum())}


def run_part():
    """train.py as a user runs it, the paper's flags, on the CPU: one epoch of the group, the validation, the
    per-epoch summaries and the 10-crop evaluation; its peak resident memory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as model_dir:
        args = ["--flagfile=configs/paper.flags", f"--data_dir={_DATA.value}", f"--model_dir={model_dir}"]
        args += ["--epochs=1", "--train_on_cpu", f"--batch_size={_BATCH.value}", f"--precision={_PRECISION.value}"]
        args += [f"--image_size={_IMAGE_SIZE.value}", f"--crop_size={_CROP_SIZE.value}", "--log_every_steps=1000"]
        subprocess.run([sys.executable, "train.py", *args], cwd=root, capture_output=True, check=True)
    return {"peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure(part, data=None):
    args = [sys.executable, __file__, f"--part={part}", *sys.argv[1:]] + ([f"--data={data}"] if data else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if _PART.value:
        parts = {"train": train_part, "evaluate": evaluate_part, "reader": reader_part, "run": run_part}
        print(json.dumps(parts[_PART.value]()))
        return
    config = _config()
    shape = f"batch {config.batch_size}, {_CLASSES.value} classes, {config.crop_size} crops, {config.precision}"
    print(f"Peak resident memory, one fresh process per part ({shape}):", flush=True)
    train = measure("train")
    print(f"  TensorFlow's runtime: {train['runtime']:,.0f} MB")
    print(
        f"  training step: {train['peak']:,.0f} MB at its peak: {train['built'] - train['runtime']:,.0f} MB for "
        f"the network and optimizer built ({train['weights_and_momentum']:,.0f} MB of weights and momentum), "
        f"{train['peak'] - train['built']:,.0f} MB more for its steps (activations, gradients, kernels' workspace)"
    )
    evaluate = measure("evaluate")
    print(
        f"  10-crop evaluation: {evaluate['peak']:,.0f} MB at its peak: {evaluate['built'] - evaluate['runtime']:,.0f}"
        f" MB for the network built, {evaluate['peak'] - evaluate['built']:,.0f} MB more for a batch's ten crops "
        "and their activations"
    )
    with tempfile.TemporaryDirectory() as folder:
        count, shards = data_input.GROUP_SHARDS * _RECORDS.value, data_input.GROUP_SHARDS
        validation = (2 * _RECORDS.value // 5, 2)  # As ImageNet's: 50,000 validation images to 1.28M.
        kind = records.write(folder, count, shards, _PHOTOS.value, classes=_CLASSES.value, validation=validation)
        reader = measure("reader", folder)
        whole = measure("run", folder)
    per_record, held = reader["group_mb"] * MB / reader["records"] / 1024, reader["peak"] - reader["runtime"]
    print(
        f"  training reader: {held:,.0f} MB above the runtime at its peak, reading a group of "
        f"{data_input.GROUP_SHARDS} shards ({reader['records']:,} records of {kind}, {per_record:.0f} KB each, "
        f"{reader['group_mb']:,.0f} MB): {held / reader['group_mb']:.1f}x the group's bytes"
    )
    print(
        f"  train.py (the paper's flags, --train_on_cpu, one epoch of that group, its validation and summaries, "
        f"the 10-crop evaluation): {whole['peak']:,.0f} MB at its peak"
    )


if __name__ == "__main__":
    app.run(main)
