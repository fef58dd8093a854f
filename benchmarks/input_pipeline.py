r"""The training input at GPU scale: the reader against a plain tf.data pipeline, through a tf.data service, and
feeding a training step, each measured against its reference in the same run.

    python benchmarks/input_pipeline.py [--images=16384] [--rounds=5] [--photos='GLOB'] [--step_rounds=3]

Writes --images records as the converter does (256x256 JPEG, quality 90, 16 shards), made from real photos given
by --photos (random crops) or else the demo set's drawings. The machine is shared, so every round times each
contestant once, in turn, and the figures are medians over rounds of per-round ratios:
1. reader / plain: pipeline/reader/input.py's train_dataset (group shuffle, parse with the Example spec, decode in
   order, batch, prefetch) vs TFRecordDataset -> parse -> decode_jpeg -> batch over the same shards and cores.
2. service / in-process: the same reader served by a tf.data service dispatcher and two worker processes on
   loopback (python -m pipeline.data_service), sharing every core with the training process; and the CPU the
   training process spends per image either way. Then, on Linux, with the cores split in two as if on separate
   hosts: a service whose one worker is pinned to one half, the training process to the other, against the
   reader in-process on the worker's half alone.
3. real / synthetic: the paper's training step (224 crops, batch 128) fed by the reader vs by one in-memory batch;
   and the cost of reading every step's metrics on the host before the next step (a sync per step).
Last: decoding images/s per core, and how many host cores (or service workers) one GPU at 20,000 images/s needs.
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import records  # benchmarks/records.py, beside this script.
import tensorflow as tf
from absl import app, flags

from pipeline import example_spec
from pipeline.reader import input as data_input
from training import devices, recipe
from training import step as train_step

# 1,024 records a shard, as ImageNet's 1,024 training shards hold ~1,250: a group of shards (the unit the reader
# shuffles and the service deals out) is then as long as on ImageNet, and an epoch many times a consumer's buffers.
_IMAGES = flags.DEFINE_integer("images", 16384, "Training records to write and read.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds of the reader comparisons.")
_STEP_ROUNDS = flags.DEFINE_integer("step_rounds", 3, "Rounds of the training-step comparison (0: skip it).")
_STEPS = flags.DEFINE_integer("steps", 4, "Training steps timed per contestant and round.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per batch.")
_PHOTOS = flags.DEFINE_string("photos", None, "Glob of real photos to crop the records from; default: drawings.")
GPU_IMAGES_PER_SECOND = 20_000
SHARDS = 16
WARMUP_BATCHES = 8
SYNCED = "synthetic, each step's metrics read before the next"


def plain(files):
    """The reference: read, parse, decode, batch, prefetch; nothing else."""
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    ds = ds.map(
        lambda r: tf.io.decode_jpeg(example_spec.parse_example(r)[example_spec.ENCODED], channels=3),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.batch(_BATCH.value, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def cpu_seconds(pid):
    """User + system CPU time of process pid so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def images_per_second(dataset, workers=()):
    """Steady state: images/s and this process's CPU ms per image, from the end of the warm-up batches to the
    arrival of the last; and the CPU ms per image of the service worker processes `workers`, over every batch."""
    worker_cpu = sum(cpu_seconds(pid) for pid in workers)
    iterator = iter(dataset)

    def images(batch):
        return int(tf.shape(batch[0] if isinstance(batch, tuple) else batch)[0])

    # Start-up is not throughput: the warm-up, a service job's creation, and the batches the producers buffered
    # meanwhile (a service consumer's outstanding requests, a worker's next batch, the reader's prefetch), which
    # would arrive at once.
    first = sum(images(next(iterator)) for _ in range(WARMUP_BATCHES))
    start, cpu, count = time.perf_counter(), time.process_time(), 0
    for batch in iterator:
        count += images(batch)
        end, end_cpu = time.perf_counter(), time.process_time()
    # Nor is the wait for the end of the epoch after its last batch: a service client learns that its job has
    # ended from the dispatcher, which it asks about once a second.
    rate, ms = count / (end - start), 1000 * (end_cpu - cpu) / count
    return rate, ms, 1000 * (sum(cpu_seconds(pid) for pid in workers) - worker_cpu) / (first + count)


def compare(contestants, rounds):
    """name -> [(images/s, CPU ms per image, service workers' CPU ms per image) per round]: contestants are name
    -> (make a dataset, service worker pids), each run once a round, in turn (after one warm-up round)."""
    rates = {name: [] for name in contestants}
    for round_ in range(rounds + 1):
        for name, (make, workers) in contestants.items():
            rate = images_per_second(make(), workers)
            if round_:
                rates[name].append(rate)
    return rates


def pin(pid, cpus):
    """Every thread of process pid onto cpus (threads started later inherit it from the thread starting them)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # The thread ended meanwhile.
            os.sched_setaffinity(int(thread), cpus)


def start_service(workers=2, cpus=None):
    """A dispatcher and worker processes on loopback, as users start them, the workers on cpus if given; returns
    (address, processes)."""
    command = [sys.executable, "-m", "pipeline.data_service"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    dispatcher = subprocess.Popen([*command, "--role=dispatcher"], env=env, stdout=subprocess.PIPE, text=True)
    address = dispatcher.stdout.readline().split()[-1]  # "... serving at grpc://localhost:PORT" (any free port).
    processes = [dispatcher]
    for _ in range(workers):
        worker = [*command, "--role=worker", f"--dispatcher={address.removeprefix('grpc://')}"]
        place = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        processes.append(subprocess.Popen(worker, env=env, preexec_fn=place))
    return address, processes


def report(rates, name, reference, target):
    ratios = [a[0] / b[0] for a, b in zip(rates[name], rates[reference], strict=True)]
    rate, ref = (statistics.median(r[0] for r in rates[n]) for n in (name, reference))
    cpu, ref_cpu, workers = (
        statistics.median(r[i] for r in rates[n]) for n, i in ((name, 1), (reference, 1), (name, 2))
    )
    print(
        f"  {name}: {rate:.0f} img/s vs {reference} {ref:.0f} img/s: {statistics.median(ratios):.2f} (median of "
        f"{len(ratios)} rounds' ratios, {min(ratios):.2f}-{max(ratios):.2f}; target >= {target}); this process's "
        f"CPU {cpu:.2f} vs {ref_cpu:.2f} ms per image" + (f", its service workers' {workers:.2f}" if workers else "")
    )
    return statistics.median(ratios)


def step_rates(files, sizes, rounds):
    """The paper's step at batch 128 fed by the reader vs by an in-memory batch: as compare() returns."""
    config = recipe.Config(batch_size=_BATCH.value, mirrored_devices=("/device:CPU:0",))
    strategy = devices.make_strategy(config)
    stats = {"mean_image": np.full((256, 256, 3), 120.0), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}
    with strategy.scope():
        model, optimizer = train_step.build_model(config, 1000, stats)
    step = train_step.make_train_step(model, optimizer, strategy, config)
    batch = next(iter(data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=_BATCH.value)))
    sources = {
        "synthetic": lambda: tf.data.Dataset.from_tensors(batch).repeat(),
        "reader": lambda: data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=_BATCH.value).repeat(),
        # What the loop once did under the tf.data service (to see whether the epoch had ended): the host reads
        # every step's result before it starts the next. It now reads the step before the last.
        SYNCED: lambda: tf.data.Dataset.from_tensors(batch).repeat(),
    }
    iterators = {
        name: iter(strategy.distribute_datasets_from_function(lambda _, m=make: m())) for name, make in sources.items()
    }
    rates = {name: [] for name in sources}
    for round_ in range(rounds + 1):
        for name, iterator in iterators.items():
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(_STEPS.value):
                metrics = step(next(iterator), tf.constant(i, tf.int64), tf.constant(0.0))
                if name == SYNCED:
                    float(metrics["loss"])
            float(metrics["loss"])
            images = _STEPS.value * _BATCH.value
            if round_:
                ms = 1000 * (time.process_time() - cpu) / images
                rates[name].append((images / (time.perf_counter() - start), ms, 0.0))
    return rates


def main(argv):
    del argv
    if _IMAGES.value // _BATCH.value < 2 * WARMUP_BATCHES:
        raise app.UsageError(
            f"--images={_IMAGES.value}: at least {2 * WARMUP_BATCHES * _BATCH.value} (the first {WARMUP_BATCHES} "
            "batches of every epoch are not timed, and as many again are needed to time anything)"
        )
    folder = tempfile.mkdtemp()
    kind = records.write(folder, _IMAGES.value, SHARDS, _PHOTOS.value)
    files = data_input.shard_files(folder, "train")
    with open(os.path.join(folder, "summary.json")) as f:
        sizes = data_input.shard_sizes(files, json.load(f), "train")  # Only the training split's part is written.
    cores = os.cpu_count()
    kib = sum(os.path.getsize(f) for f in files) / sizes.sum() / 1024
    print(f"{_IMAGES.value} records from {kind}, {kib:.0f} KiB each; {cores} cores")

    every = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    receiving, decoding = set(every[: len(every) // 2]), set(every[len(every) // 2 :])
    service, servers = start_service()
    split = len(every) > 1  # A service whose one worker decodes on half the cores, the training process on the rest.
    split_service, split_servers = start_service(1, decoding) if split else (None, [])
    jobs = iter(range(10**6))

    def placed(make, cpus=every, workers=()):
        """(make, run with this process's threads on cpus; the service worker processes it reads from)."""

        def run():
            if split:
                pin(os.getpid(), cpus)
            return make()

        return run, [worker.pid for worker in workers]

    def reader(**kwargs):
        return lambda: data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=_BATCH.value, **kwargs)

    def served(address):
        """One pass of the training set from a run's stream (a job each time, so that none starts half read)."""
        steps = int(sizes.sum()) // _BATCH.value
        return lambda: data_input.service_dataset(
            files, sizes, seed=0, batch_size=_BATCH.value, data_service=address, job=f"bench{next(jobs)}"
        ).take(steps)

    contestants = {
        "plain": placed(lambda: plain(files)),
        "reader": placed(reader()),
        "reader, order not kept": placed(reader(deterministic=False)),
        "service": placed(served(service), workers=servers[1:]),
    }
    if split:
        contestants["reader on half the cores"] = placed(reader(), decoding)
        contestants["service, its worker on that half"] = placed(served(split_service), receiving, split_servers[1:])
    try:
        rates = compare(contestants, _ROUNDS.value)
    finally:
        for server in servers + split_servers:
            server.terminate()
        if split:
            pin(os.getpid(), every)
    print("Reading (images/s delivered, uint8 256x256 batches of 128):")
    report(rates, "reader", "plain", 0.9)
    report(rates, "reader, order not kept", "plain", 0.9)
    report(rates, "service", "reader", 0.9)
    per_core = statistics.median(r[0] for r in rates["plain"]) / cores
    print(
        f"Decoding: {per_core:.0f} images/s per core here: one GPU at {GPU_IMAGES_PER_SECOND:,} images/s needs "
        f"{GPU_IMAGES_PER_SECOND / per_core:.0f} such cores"
    )
    if split:
        print(
            f"Through a service whose one worker decodes on {len(decoding)} of the {len(every)} cores, the training "
            f"process on the other {len(receiving)}, as on separate hosts:"
        )
        own = report(rates, "service, its worker on that half", "reader on half the cores", 0.9)
        rate = statistics.median(r[0] for r in rates["service, its worker on that half"]) / len(decoding)
        print(
            f"  so a worker's core delivers {rate:.0f} images/s, {own:.2f} of what it decodes in-process: one GPU at "
            f"{GPU_IMAGES_PER_SECOND:,} images/s needs {GPU_IMAGES_PER_SECOND / rate:.0f} cores of tf.data service "
            "workers"
        )
    if _STEP_ROUNDS.value:
        print(f"Training step (224 crops, batch {_BATCH.value}, one replica):")
        rates = step_rates(files, sizes, _STEP_ROUNDS.value)
        report(rates, "reader", "synthetic", 0.95)
        report(rates, SYNCED, "synthetic", 0.95)


if __name__ == "__main__":
    app.run(main)
