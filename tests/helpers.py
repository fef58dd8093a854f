"""Helpers shared by the test modules (fixtures live in conftest.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_DEVICES = ("/device:CPU:0", "/device:CPU:1")
PHOTOS = os.path.join(ROOT, "..", "shared", "data", "photos")
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 2


def tiny_run_config(data_dir, model_dir, **overrides):
    """Two epochs of the tiny demo set (63 training images: 3 steps of 16 an epoch) on two mirrored replicas,
    with a checkpoint every 2 steps and a 4-step warm-up."""
    from training import recipe

    values = dict(
        data_dir=data_dir,
        model_dir=str(model_dir),
        epochs=2,
        batch_size=16,
        learning_rate=0.005,
        weight_std=0.02,
        warmup_steps=4,
        lr_patience=1,
        image_size=64,
        crop_size=64,
        mirrored_devices=TWO_DEVICES,
        log_every_steps=1,
        checkpoint_every_steps=2,
    )
    return recipe.Config(**{**values, **overrides})


# train.py's flags for a tiny demo-set run as a command (tiny_run_config's settings), on CPU devices.
TINY_TRAIN_FLAGS = (
    "--image_size=64",
    "--crop_size=64",
    "--learning_rate=0.005",
    "--weight_std=0.02",
    "--eval_crops=1",
    "--train_on_cpu",
    "--log_every_steps=1",
)


def photos_dir():
    """../shared/data/photos, or a skip when this checkout has no shared folder beside it."""
    if not os.path.isdir(PHOTOS):
        pytest.skip("../shared/data/photos is absent")
    return PHOTOS


def run_conversion(input_dir, output_dir, **overrides):
    """The Beam job in-process on the DirectRunner (one worker: fast to start in tests); overrides are
    conversion.Config's fields."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.beam import conversion, sources, transforms

    settings = dict(
        input_dir=input_dir,
        output_dir=output_dir,
        train_shards=4,
        validation_shards=2,
        val_labels=sources.load_val_labels(input_dir),
        class_names=sources.resolve_class_names(input_dir),
    )
    with beam.Pipeline(options=PipelineOptions(direct_num_workers=1)) as p:
        _ = p | transforms.ConvertImageNet(conversion.Config(**{**settings, **overrides}))
    return output_dir


def run(*args, cwd=ROOT, env=None, timeout=600):
    """A command as users type it, `python ARGS...`, from the project root."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def eager_compiled_and_in_data(fn, *args):
    """fn(*args) eagerly, checked equal to the same call inside tf.function and inside a tf.data map
    (big_vision's way of testing preprocessing ops); returns the eager result as NumPy."""
    eager = tf.nest.map_structure(np.asarray, fn(*args))
    compiled = tf.nest.map_structure(np.asarray, tf.function(fn)(*args))
    data = tf.data.Dataset.from_tensors(tuple(args)).map(lambda *a: fn(*a))
    in_data = tf.nest.map_structure(np.asarray, next(iter(data)))
    for other in (compiled, in_data):  # Exact for integers; float ops may be fused differently when compiled.
        check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)  # noqa: E731
        tf.nest.map_structure(check, eager, other, check_types=False)
    return eager


def free_ports(n):
    """n TCP ports free on loopback right now."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _as_in_a_terminal():
    """Ctrl-C as a terminal delivers it, even when the tests run as a background job (which ignores SIGINT)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, env=None):
    """A command as users type it, started in the background; its output goes to a temporary file."""
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read by output(), after the process ends)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_as_in_a_terminal,
    )
    process.log = log
    return process


def output(process, timeout=600):
    """Waits for a started command; returns (exit status, everything it printed)."""
    process.wait(timeout=timeout)
    process.log.seek(0)
    return process.returncode, process.log.read()


def scalars(folder, tag):
    """{step: value} of a scalar a run wrote under folder (train/, validation/, eval/), or, for tag None,
    TensorBoard's own reader of the folder."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)} if tag else acc
