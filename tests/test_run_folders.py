"""Run folders wherever TensorFlow can write. TensorFlow's in-memory ram:// file system (alive as long as the
process) stands in for a bucket: an os, shutil or open call on a run's folder fails there or writes to the local
disk instead, as it would do nothing on gs://."""

import os

import numpy as np
import tensorflow as tf

from pipeline.reader import input as data_input
from tests.helpers import tiny_run_config
from tools import serving, similarity
from training import checkpoints, checks, evaluation, loop, recipe
from training.position import Position


def _copy_tree(source, destination):
    for folder, _, names in tf.io.gfile.walk(source):
        target = destination + folder[len(source) :]
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(folder, name), f"{target}/{name}", overwrite=True)


def test_a_run_evaluated_exported_and_searched_in_memory_leaves_nothing_on_the_local_disk(
    demo_data, demo_raw, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # Where a relative "ram:/..." path would land if an os call took it.
    _copy_tree(demo_data, "ram://data")
    config = tiny_run_config("ram://data", "ram://run", epochs=1, eval_crops=1, checkpoint_every_steps=1)
    result = loop.train(config, flags_text="--epochs=1\n")
    with tf.io.gfile.GFile("ram://run/eval.json") as f:
        assert f.read().startswith('{\n  "top1_error"')
    assert {"config.json", "labels.txt", "flags.txt", "checkpoints", "best", "train", "validation", "eval"} <= set(
        name.rstrip("/") for name in tf.io.gfile.listdir("ram://run")
    )
    assert not tf.io.gfile.glob("ram://run/*.tmp")  # Each small file written whole, then renamed.

    # tools.evaluate: the best checkpoint on the validation split, as the final evaluation saw it.
    model, settings, labels, path = checkpoints.restore_classifier("ram://run", "best")
    files = data_input.shard_files("ram://data", "validation")
    sizes = data_input.shard_sizes(files, data_input.load_summary("ram://data"), "validation")
    strategy = checks.strategy_for("mirrored", ("/device:CPU:0",))
    again = evaluation.evaluate(model, strategy, files, sizes, batch_size=16, image_size=64, crops=1, labels=labels)
    assert path == "ram://run/best/ckpt-3" and again["top1_error"] == result["top1_error"]
    checkpoints.write_file("ram://run/evaluation.json", str(again["top1_error"]))

    # tools.export, then the SavedModel served from memory.
    serving.export(model, labels, "ram://export/alexnet/1")
    serve = tf.saved_model.load("ram://export/alexnet/1").signatures["serving_default"]
    with open(os.path.join(demo_raw, "val", "ILSVRC2012_val_00000001.JPEG"), "rb") as f:
        assert serve(image_bytes=tf.constant([f.read()]))["names"].shape == (1, 5)

    # tools.neighbours: Figure 4's search over the training shards, its PNG and its TensorBoard image.
    train_files = data_input.shard_files("ram://data", "train")
    train_sizes = data_input.shard_sizes(train_files, data_input.load_summary("ram://data"), "train")
    queries = next(iter(data_input.eval_dataset(files, sizes, batch_size=2, image_size=64)))[0]
    _, neighbours, _ = similarity.nearest(model, queries, train_files, train_sizes, k=2, batch_size=16)
    picture = similarity.figure_4(queries, neighbours)
    tf.io.write_file("ram://run/neighbours.png", tf.io.encode_png(tf.cast(tf.round(picture[0] * 255), tf.uint8)))
    with tf.summary.create_file_writer("ram://run/neighbours").as_default(step=0):
        tf.summary.image("figure_4", picture)
    assert tf.io.gfile.exists("ram://run/neighbours.png") and tf.io.gfile.listdir("ram://run/neighbours")

    assert os.listdir(tmp_path) == []


def test_a_worker_that_is_not_the_chief_deletes_its_checkpoints_wherever_they_are():
    """Under several workers each one saves, and only the chief's are kept (TensorFlow's guide): the others'
    copies are deleted through TensorFlow's file system, which reaches a bucket (shutil.rmtree would not)."""
    model = tf.Module()
    model.weights = tf.Variable(np.ones(3))
    config = recipe.Config(model_dir="ram://workers", keep_checkpoints=2)
    saved = checkpoints.RunCheckpoints(config, model=model, optimizer=tf.Module(), worker=1)
    saved.save(Position(step=7), best=True)
    assert not tf.io.gfile.exists("ram://workers/.worker-1")
    chief = checkpoints.RunCheckpoints(config, model=model, optimizer=tf.Module())
    chief.save(Position(step=7), best=True)
    assert tf.train.latest_checkpoint("ram://workers/checkpoints") == "ram://workers/checkpoints/ckpt-7"
    assert tf.train.latest_checkpoint("ram://workers/best") == "ram://workers/best/ckpt-7"
