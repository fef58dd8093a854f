"""More hosts than accelerators: the reading and decoding on a tf.data service (a dispatcher and two workers on
loopback, started here), the training on this process."""

import collections
import signal
import time

import grpc
import pytest
import tensorflow as tf

from pipeline.reader import input as data_input
from pipeline.reader import service as servers_api
from tests.helpers import TINY_TRAIN_FLAGS, free_ports, output, start, tiny_run_config
from training import feed, loop


@pytest.fixture(scope="module")
def service():
    """A dispatcher and two workers started as users start them (python -m pipeline.data_service), on loopback."""
    port = free_ports(1)[0]
    servers = [start("-m", "pipeline.data_service", "--role=dispatcher", f"--port={port}")]
    servers += [start("-m", "pipeline.data_service", "--role=worker", f"--dispatcher=localhost:{port}") for _ in "ab"]
    deadline = time.monotonic() + 60
    while _registered(f"localhost:{port}") < 2:
        assert time.monotonic() < deadline and all(s.poll() is None for s in servers), "the servers did not start"
        time.sleep(0.5)
    yield f"grpc://localhost:{port}"
    for server in servers:
        server.kill()
        server.wait()


def _registered(dispatcher):
    try:
        return len(servers_api.worker_addresses(dispatcher, timeout=2))
    except grpc.RpcError:  # Not serving yet.
        return 0


def _fingerprints(dataset):
    return collections.Counter(
        (hash(image.tobytes()), int(label))
        for images, labels in dataset
        for image, label in zip(images.numpy(), labels.numpy(), strict=True)
    )


def test_every_image_is_delivered_once_an_epoch_through_the_service(demo_data, service):
    files = data_input.shard_files(demo_data, "train")
    sizes = data_input.shard_sizes(files, data_input.load_summary(demo_data), "train")
    local = data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=1, image_size=64)
    served = data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=1, image_size=64, data_service=service)
    expected = _fingerprints(local)
    assert sum(expected.values()) == sizes.sum() == 63
    assert _fingerprints(served) == expected  # Each image once: none lost, none twice.


def test_training_reads_its_batches_from_the_service(demo_data, service, tmp_path):
    config = tiny_run_config(demo_data, tmp_path, epochs=1, batch_size=8, eval_crops=1, data_service=service)
    result = loop.train(config)
    assert result["images"] == 20
    step = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
    # 63 images over 2 service workers in batches of 4 per replica: each worker drops under a batch.
    assert 6 <= step.get_tensor("state/step/.ATTRIBUTES/VARIABLE_VALUE") <= 7


def test_a_consumer_holds_at_most_4_steps_of_a_shared_epoch(demo_data, service):
    """Trainers share an epoch's job first-come first-served: one that starts first must not take the epoch
    from the others into its buffer (unbounded, it held 17 of these 63)."""
    files = data_input.shard_files(demo_data, "train")
    sizes = data_input.shard_sizes(files, data_input.load_summary(demo_data), "train")
    make = lambda: data_input.train_dataset(  # noqa: E731
        files, sizes, seed=0, epoch=0, batch_size=1, image_size=64, data_service=service, job="shared"
    )
    first = iter(make())
    next(first)
    time.sleep(2)  # Its buffer fills.
    other = sum(1 for _ in make())
    held = sum(1 for _ in first)
    assert 1 + held + other == 63
    assert held <= 4 + 2  # 4 steps of 1 batch, and the two the service client keeps besides.


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), pytest.param((signal.SIGINT, signal.SIGINT), marks=pytest.mark.slow)],
    ids=["sigterm", "ctrl-c x2"],
)
def test_a_stop_while_waiting_for_batches_that_never_come_exits_within_the_grace(demo_data, tmp_path, signals):
    """A dispatcher without workers: the first step waits for ever, and Python runs no signal handler meanwhile.
    SIGTERM cannot be honoured after a step that never ends, so the run exits unsaved GRACE_SECONDS later, with the
    preemption's status; a second Ctrl-C stops it at once."""
    port = free_ports(1)[0]
    dispatcher = start("-m", "pipeline.data_service", "--role=dispatcher", f"--port={port}")
    args = [f"--data_dir={demo_data}", f"--model_dir={tmp_path}", "--epochs=1", "--batch_size=8"]
    trainer = start("train.py", *args, *TINY_TRAIN_FLAGS, f"--data_service=grpc://localhost:{port}")
    try:
        deadline = time.monotonic() + 120
        while "Training images from the tf.data service" not in _printed(trainer):
            assert time.monotonic() < deadline and trainer.poll() is None, _printed(trainer)[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # Into the first step, waiting.
        sent = time.monotonic()
        for signum in signals:
            trainer.send_signal(signum)
            time.sleep(2)
        status, printed = output(trainer, timeout=60)
        waited = time.monotonic() - sent
    finally:
        dispatcher.kill()
    if len(signals) == 1:
        assert status == loop.PREEMPTED_EXIT_CODE, printed[-3000:]
        assert "no step finished within 10 s of SIGTERM (waiting for input?)" in printed
        assert loop.Preemption.GRACE_SECONDS <= waited < loop.Preemption.GRACE_SECONDS + 10
    else:
        assert status == 128 + signal.SIGINT and "Ctrl-C again: stopped at once" in printed, printed[-3000:]
        assert waited < loop.Preemption.GRACE_SECONDS


def _printed(process):
    process.log.seek(0)
    return process.log.read()


def test_a_runs_service_jobs_are_its_own_and_kept_when_it_resumes(tmp_path, monkeypatch):
    """Two runs given the same relative --model_dir on two machines read other jobs (they would split every epoch
    between them); one run started again reads its own job again (it rejoins its epoch)."""
    strategy = tf.distribute.get_strategy()
    ids = []
    for machine in ("a", "b"):
        (tmp_path / machine).mkdir()
        monkeypatch.chdir(tmp_path / machine)
        ids.append(feed.service_job_id("run", strategy))
        assert feed.service_job_id("run", strategy) == ids[-1]
    assert ids[0] != ids[1]
