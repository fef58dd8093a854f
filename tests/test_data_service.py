"""More hosts than accelerators: the reading and decoding on a tf.data service (a dispatcher and two workers on
loopback, started here), the training on this process."""

import collections
import os
import re
import signal
import threading
import time
import types

import grpc
import numpy as np
import pytest
import tensorflow as tf

from pipeline.reader import input as data_input
from pipeline.reader import service as servers_api
from tests.helpers import TINY_TRAIN_FLAGS, free_ports, output, scalars, start, tiny_run_config
from training import checks, feed, loop, stopping
from training.position import Position


@pytest.fixture(scope="module")
def service():
    """A dispatcher and two workers started as users start them (python -m pipeline.data_service), on loopback."""
    port = free_ports(1)[0]
    servers = [start("-m", "pipeline.data_service", "--role=dispatcher", f"--port={port}")]
    servers += [start("-m", "pipeline.data_service", "--role=worker", f"--dispatcher=localhost:{port}") for _ in "ab"]
    _wait_for_workers(f"localhost:{port}", servers, 2)
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


def _stream(demo_data, service, job, batch_size=1):
    files = data_input.shard_files(demo_data, "train")
    sizes = data_input.shard_sizes(files, data_input.load_summary(demo_data), "train")
    stream = data_input.service_dataset(
        files, sizes, seed=0, batch_size=batch_size, data_service=service, job=job, image_size=64
    )
    return stream, files, sizes


def test_every_image_is_delivered_once_a_pass_through_the_service(demo_data, service):
    """The job's stream runs pass after pass: each of the first passes holds every image once, none twice."""
    stream, files, sizes = _stream(demo_data, service, "once-a-pass")
    local = data_input.train_dataset(files, sizes, seed=0, epoch=0, batch_size=1, image_size=64)
    expected = _fingerprints(local)
    assert sum(expected.values()) == sizes.sum() == 63
    by_pass = collections.defaultdict(collections.Counter)
    for images, labels, passes in stream.take(3 * 63):
        by_pass[int(passes[0])][(hash(images[0].numpy().tobytes()), int(labels[0]))] += 1
    assert by_pass[0] == by_pass[1] == expected


def test_training_reads_its_batches_from_the_service(demo_data, service, tmp_path, capsys):
    config = tiny_run_config(demo_data, tmp_path, epochs=2, batch_size=8, eval_crops=1, data_service=service)
    result = loop.train(config)
    assert result["images"] == 20
    step = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))
    assert step.get_tensor("state/step/.ATTRIBUTES/VARIABLE_VALUE") == 7 + 8  # 63 // 8, then 126 // 8 - 7.
    printed = capsys.readouterr().out
    report = re.search(
        r"epoch 2: the tf.data service delivered (\d+) of pass 1's 63 training images; (\d+) missed", printed
    )
    delivered, missed = int(report[1]), int(report[2])
    assert delivered + missed == 63
    assert scalars(tmp_path / "train", "epoch/images_missed") == {15: missed}
    # The demo set's pass is one group: one worker holds all of pass 1 while the other reads pass 2 and on, and the
    # 120 images of epochs 1 and 2 come from both. Only a worker three times slower than the other leaves most of
    # pass 1 untrained by then (an even share gives 60, the rest of it comes in epoch 3 as late images).
    assert delivered > 63 // 2, printed


def test_an_epoch_report_counts_a_pass_by_what_was_trained_of_it_and_names_late_images():
    position = Position(step=24, epoch=2, passes=(5.0, 60.0, 0.0, 0.0, 0.0))
    data = types.SimpleNamespace(files={"train": ["a", "b"]}, sizes={"train": np.array([40, 23])})
    service = feed.Service(None, tf.distribute.get_strategy(), data, job="j")
    values, line = service.epoch_report(position)
    assert values == {"epoch/images_missed": 3}
    assert line.startswith("the tf.data service delivered 60 of pass 2's 63 training images; 3 missed (held by lost")
    assert "; 5 of the epoch's images were of earlier passes: late from a slow worker, or, if many, the" in line
    assert service.epoch_report(Position()) == ({}, None)


def test_a_trainer_that_stops_leaves_at_most_4_steps_of_the_stream_unread(demo_data, service):
    """What one trainer's client had received and not yet trained is lost with it, once: bounded, so that a
    stopped or slow trainer costs the others little (unbounded, a consumer held 17 of these 63)."""
    first = iter(_stream(demo_data, service, "stopped")[0])
    next(first)
    time.sleep(2)  # Its buffer fills.
    del first  # Stopped: what it held is gone.
    second = _stream(demo_data, service, "stopped")[0]
    # Three passes' worth read: the demo set's pass is one group, so one worker holds what is left of pass 0 while
    # the other reads passes 1 and 2; the count does not hang on the two being equally fast.
    seen = sum(1 for _, _, passes in second.take(3 * 63) if int(passes[0]) == 0)
    assert 63 - 1 - (4 + 2) <= seen <= 63 - 1  # 4 steps of 1 batch, and the two the service client keeps besides.


def test_an_epoch_finishes_from_the_workers_left_when_one_is_lost_and_workers_added_or_started_again_take_over(
    demo_data, tmp_path, capsys
):
    """One worker, then a second added in epoch 1, then the first killed (-9): every epoch takes its planned steps
    from the workers there are, and each pass's images never trained are counted. The first started again at its
    address, then the second killed for good: the run ends on the one started again (TensorFlow gives it its old
    task back). A watchdog stops the run (SIGTERM: it saves) should the steps stop coming, so that a regression
    fails rather than waits."""
    port, first = free_ports(2)
    command = ["-m", "pipeline.data_service", "--role=worker", f"--dispatcher=localhost:{port}"]
    servers = [start("-m", "pipeline.data_service", "--role=dispatcher", f"--port={port}")]
    servers.append(start(*command, f"--port={first}"))
    dispatcher, taken = f"localhost:{port}", []
    try:
        _wait_for_workers(dispatcher, servers, 1)

        def events(step):
            taken.append(time.monotonic())
            if step == 3:  # Epoch 1 of 7 steps.
                servers.append(start(*command))
                _wait_for_workers(dispatcher, servers, 2)
            if step in (5, 14):
                servers[1 if step == 5 else 2].kill()
            if step == 9:
                servers[1] = start(*command, f"--port={first}")  # As a supervisor restarts it: the same address.

        def watchdog():
            while not taken or time.monotonic() - taken[-1] < 120:
                time.sleep(1)
                if len(taken) == 23:
                    return
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watchdog, daemon=True).start()
        config = tiny_run_config(demo_data, tmp_path, epochs=3, batch_size=8, data_service=f"grpc://{dispatcher}")
        loop.train(config, before_step=events)
    finally:
        for server in servers:
            server.kill()
            server.wait()
    printed = capsys.readouterr().out
    steps = [int(s) for s in re.findall(r"^step (\d+)/23 ", printed, re.M)]
    assert steps == list(range(1, 24))  # 7, 8 and 8 steps: (e + 1) * 63 // 8 - e * 63 // 8.
    reports = re.findall(
        r"the tf.data service delivered (\d+) of pass (\d)'s 63 training images; (\d+) missed", printed
    )
    assert [(int(d) + int(m), p) for d, p, m in reports] == [(63, "1"), (63, "2")], printed
    assert sum(int(m) for _, _, m in reports) > 0  # What the killed workers held, never trained.


def _wait_for_workers(dispatcher, servers, count):
    deadline = time.monotonic() + 60
    while _registered(dispatcher) < count:
        assert time.monotonic() < deadline and all(s.poll() is None for s in servers), "the servers did not start"
        time.sleep(0.5)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["sigterm", "ctrl-c"]
)
def test_a_stop_while_waiting_for_batches_that_never_come_saves_and_exits_at_once(demo_data, tmp_path, signum):
    """A dispatcher without workers: the first step waits for ever, and Python runs nothing on the main thread
    meanwhile. The batch is awaited by another thread, so the request is seen while waiting: nothing of the step
    has run, the run saves where it is (step 0) and exits with the signal's status, in a second or so rather than
    at the grace period's end, unsaved."""
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
        trainer.send_signal(signum)
        status, printed = output(trainer, timeout=60)
        waited = time.monotonic() - sent
    finally:
        dispatcher.kill()
    name = signal.Signals(signum).name
    assert status == 128 + signum and f"stopped by {name}: saved step 0" in printed, printed[-3000:]
    assert waited < stopping.Preemption.GRACE_SECONDS
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-0")


def _printed(process):
    process.log.seek(0)
    return process.log.read()


def test_a_runs_service_job_is_its_own_and_kept_when_it_resumes(tmp_path, monkeypatch):
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
    (tmp_path / "b" / "run" / feed.JOB_ID).write_bytes(b"\xff not an id")
    with pytest.raises(checks.ConfigError, match=r"run/.service_job is not a tf.data service job id .*: delete it"):
        feed.service_job_id("run", strategy)
