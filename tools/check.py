r"""Checks a machine before a long run: the devices `train.py` would train on with these flags, each part of the
step running on each of them, the all-reduce, the reader, and from those the bottleneck and how long an epoch and
the whole run would take.

    python -m tools.check --flagfile=configs/paper.flags --data_dir=DATA --model_dir=RUN [--check_steps=5]

Takes train.py's flags (the same command line, with tools.check in place of train.py) and writes nothing. The step
is timed op by op and compiled by XLA, and the faster one named (--jit_compile or not): which wins depends on the
hardware and the precision. Every finding is printed; a problem that would stop training is printed as such and
the checks go on where they can. The projection counts training steps only (validation adds a few percent: 50,000
images an epoch, forward only).
"""

import dataclasses
import statistics
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from model import lrn
from pipeline.reader import input as data_input
from training import checks, devices, recipe
from training import flags as run_flags
from training import step as train_step

run_flags.define()  # train.py's flags: the same command line checks what it would run.
_STEPS = flags.DEFINE_integer("check_steps", 5, "Training steps timed (after one to warm up).", lower_bound=1)
_BATCHES = flags.DEFINE_integer("check_batches", 20, "Batches the reader is timed on (after two).", lower_bound=1)


def _timed(fn, repeats):
    """Median seconds of fn() over `repeats` calls, after one untimed call (tracing, compiling, warming up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lrn_error(device):
    """Max |error| of §3.3's LRN of ReLU outputs (forward, and its gradient) on `device` against the formula in
    NumPy."""
    rng = np.random.default_rng(0)
    x, g = (rng.normal(0, 30, (2, 7, 7, 48)).astype(np.float32) for _ in range(2))
    with tf.device(device):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = lrn.relu_and_normalize(xt)
        grad = tape.gradient(y, xt, output_gradients=tf.constant(g))
    relu = np.maximum(x, 0)
    expected_y, expected_g = lrn.paper_formula(relu), np.where(x > 0, lrn.paper_gradient(relu, g), 0)
    return max(np.abs(y.numpy() - expected_y).max(), np.abs(grad.numpy() - expected_g).max())


def update_error(device):
    """Max |error| of §5's fused update on `device` against the rule in NumPy."""
    w0, v0, g = np.full(1000, 0.5, np.float32), np.full(1000, 0.1, np.float32), np.linspace(-1, 1, 1000, dtype="f4")
    with tf.device(device):
        w, v = tf.Variable(w0), tf.Variable(v0)
        recipe.momentum_update(w.handle, v.handle, tf.constant(g), 0.01, 0.9, 0.0005)
    expected_v = 0.9 * v0 - 0.01 * (g + 0.0005 * w0)
    return max(np.abs(v.numpy() - expected_v).max(), np.abs(w.numpy() - (w0 + expected_v)).max())


def step_runs(device, config, data):
    """Whether a compiled training step (forward, backward, the update; XLA with --jit_compile) runs on `device`
    and gives a finite loss."""
    with tf.device(device):
        model, optimizer = train_step.build_model(config, len(data.labels), data.stats, tower_devices=False)
        images = tf.zeros((2, config.image_size, config.image_size, 3), tf.uint8)

        @tf.function(jit_compile=config.jit_compile)  # As train.py compiles it: XLA with --jit_compile.
        def gradients():
            with tf.GradientTape() as tape:
                logits = tf.cast(model(images, training=True, seed=[0, 0]), tf.float32)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.zeros(2, tf.int32), logits))
            return loss, tape.gradient(loss, model.trainable_variables)

        @tf.function
        def step():
            loss, grads = gradients()
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return bool(np.isfinite(step().numpy()))


def all_reduce_seconds(strategy, shapes, repeats=3):
    """Seconds to sum gradients of these shapes (float32) over every replica, as a training step does."""

    grads = strategy.experimental_distribute_values_from_function(lambda _: [tf.ones(shape) for shape in shapes])

    @tf.function
    def reduce(grads):
        def replica(grads):
            summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
            return tf.add_n([tf.reduce_sum(g[..., :1]) for g in summed])  # Every sum waited for, little copied.

        return strategy.run(replica, (grads,))

    return _timed(lambda: [t.numpy() for t in strategy.experimental_local_results(reduce(grads))], repeats)


def step_rate(strategy, config, data, steps):
    """Images/s of training steps as train.py takes them, fed one real batch over and over (the step alone);
    and the trainable variables' shapes."""
    with strategy.scope():
        model, optimizer = train_step.build_model(config, len(data.labels), data.stats)
    step = train_step.make_train_step(model, optimizer, strategy, config)
    files, sizes = data.files["train"], data.sizes["train"]
    per_replica = config.batch_size // strategy.num_replicas_in_sync
    batch = next(
        iter(
            data_input.train_dataset(
                files, sizes, seed=0, epoch=0, batch_size=per_replica, image_size=config.image_size
            )
        )
    )
    dataset = strategy.distribute_datasets_from_function(lambda _: tf.data.Dataset.from_tensors(batch).repeat())
    iterator = iter(dataset)
    zero = tf.constant(0.0)
    seconds = _timed(lambda: float(step(next(iterator), tf.constant(0, tf.int64), zero)["loss"]), steps)
    shapes = [v.shape for v in model.trainable_variables]
    return config.batch_size / seconds, shapes


def step_rates(strategy, config, data, steps):
    """{jit_compile: images/s} of the step op by op (False) and with each replica's forward and backward pass
    compiled by XLA (True), on the devices the run would use (XLA alone where the run cannot compile: towers);
    and the trainable variables' shapes. Which is faster depends on the hardware and the precision, so it is
    measured rather than advised."""
    choices = (False,) if config.strategy == "towers" else (False, True)
    rates = {}
    for jit in choices:
        rates[jit], shapes = step_rate(strategy, dataclasses.replace(config, jit_compile=jit), data, steps)
    return rates, shapes


def step_advice(config, rates):
    """The line that says which step to give train.py, from step_rates' measurements."""
    shape = f"batch {config.batch_size}, {config.crop_size}x{config.crop_size} crops, {config.precision}"
    if True not in rates:
        return f"Training step: {rates[False]:.1f} images/s ({shape}; --jit_compile is not for --strategy=towers)"
    faster = rates[True] > rates[False]
    advice = "give --jit_compile" if faster else "leave --jit_compile off"
    if faster != config.jit_compile:
        advice += " (these flags " + ("have it" if config.jit_compile else "do not") + ")"
    return (
        f"Training step ({shape}): op by op {rates[False]:.1f} images/s, compiled by XLA (--jit_compile) "
        f"{rates[True]:.1f} images/s ({rates[True] / rates[False]:.2f}x): {advice}"
    )


def reader_rate(config, data, batches):
    """Images/s this host's reader gives (one input pipeline, as each worker has)."""
    files, sizes = data.files["train"], data.sizes["train"]
    dataset = data_input.train_dataset(
        files, sizes, seed=0, epoch=0, batch_size=config.batch_size, image_size=config.image_size
    )
    iterator = iter(dataset.repeat())
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.batch_size / (time.perf_counter() - start)


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def check(config, steps, batches):
    """Prints the findings; returns the number of problems that would stop train.py."""
    problems = 0
    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"TensorFlow {tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()}; GPUs visible: {len(gpus)}",
        flush=True,
    )
    strategy = devices.make_strategy(config)
    targets = list(config.tower_devices) if config.strategy == "towers" else list(strategy.extended.worker_devices)
    try:
        checks.check_devices(config)
        if config.strategy != "towers":
            checks.check_accelerators(config, targets)
    except checks.ConfigError as e:
        problems += 1
        print(f"PROBLEM: {e}", flush=True)
    print(f"Devices: {devices.describe(strategy, config)} ({type(strategy).__name__})", flush=True)
    data = checks.load_data(config)
    for device in targets:
        lrn_max, update_max = lrn_error(device), update_error(device)
        runs = step_runs(device, config, data)
        ok = lrn_max < 1e-4 and update_max < 1e-6 and runs
        problems += not ok
        print(
            f"  {device}: LRN {lrn_max:.1e} from §3.3's formula, update {update_max:.1e} from §5's rule, "
            f"{'XLA-' if config.jit_compile else ''}compiled step {'runs' if runs else 'FAILS (loss not finite)'}"
            + ("" if ok else "  <- PROBLEM"),
            flush=True,
        )
    rates, shapes = step_rates(strategy, config, data, steps)
    rate = rates[config.jit_compile]  # The run as these flags give it.
    gradients = sum(int(np.prod(s)) for s in shapes)
    if strategy.num_replicas_in_sync > 1:
        seconds = all_reduce_seconds(strategy, shapes)
        print(
            f"All-reduce of {gradients / 1e6:.1f}M gradients ({4 * gradients / 1e6:.0f} MB float32) over "
            f"{strategy.num_replicas_in_sync} replicas: {1000 * seconds:.0f} ms",
            flush=True,
        )
    else:
        print(f"All-reduce: none (one replica; {gradients / 1e6:.1f}M gradients)", flush=True)
    print(step_advice(config, rates), flush=True)
    workers = strategy.num_replicas_in_sync // devices.local_replicas(strategy)
    needed = rate / workers  # Each worker's reader feeds its share.
    if config.data_service:
        print("Reader: the tf.data service feeds this run (benchmarks/input_pipeline.py measures one)", flush=True)
        reading = None
    else:
        reading = reader_rate(config, data, batches)
        print(f"Reader: {reading:.0f} images/s on this host, {reading / needed:.1f}x what its step needs", flush=True)
    bottleneck = "the training step" if reading is None or reading >= needed else "the reader"
    effective = rate if reading is None else min(rate, reading * workers)
    images = int(data.sizes["train"].sum())
    epoch = images / effective
    print(
        f"Bottleneck: {bottleneck}, {effective:.1f} images/s. An epoch ({images:,} images): {duration(epoch)}; "
        f"{config.epochs} epochs: {duration(epoch * config.epochs)}",
        flush=True,
    )
    return problems


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    devices.split_cpu(flags.FLAGS.cpu_devices)  # Before TensorFlow starts its runtime.
    config = run_flags.config()
    try:
        problems = check(config, _STEPS.value, _BATCHES.value)
    except (checks.ConfigError, checks.DataError) as e:
        sys.exit(f"tools.check: {e}")
    if problems:
        sys.exit(f"tools.check: {problems} problem(s) above would stop or spoil training")


if __name__ == "__main__":
    app.run(main)
