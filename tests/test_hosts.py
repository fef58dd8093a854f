"""Two hosts (network namespaces, tests/hosts.py) running README's commands: the tf.data service with its servers
on one host and the trainer on the other; MultiWorkerMirroredStrategy with a worker on each. Lost workers,
a restarted dispatcher and preemption notices (SIGTERM) at moments the test picks while the run goes on."""

import json
import re
import signal
import subprocess
import sys

import pytest

from tests import hosts
from tests.helpers import ROOT, TINY_TRAIN_FLAGS, output, run_conversion
from training import stopping

pytestmark = pytest.mark.slow

TRAIN = ["train.py", *TINY_TRAIN_FLAGS]


@pytest.fixture(scope="module")
def two_hosts():
    with hosts.two_hosts() as pair:
        yield pair


@pytest.fixture(scope="module")
def groups_data(demo_raw, tmp_path_factory):
    """The tiny demo set in 24 training shards: 3 shard groups, so the service deals an epoch out in 3 splits."""
    return run_conversion(demo_raw, str(tmp_path_factory.mktemp("groups")), train_shards=24)


def _digest(printed):
    return re.search(r"weights sha256 ([0-9a-f]{16})", printed)[1]


def _stop(*processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_service_servers_on_one_host_feed_two_runs_on_another_through_a_lost_worker_an_added_one_and_a_dispatcher(
    two_hosts, groups_data, tmp_path
):
    """README's commands, no --worker_address: the workers advertise the address the trainers' host reaches. Two
    runs read from one dispatcher at once, each its own stream. Mid-epoch 1 one worker is killed and never started
    again, another is added, then the last original one is killed too: every epoch takes its planned steps from
    the workers there are. The dispatcher killed and started again on its journal in epoch 2: training goes on.
    Pass 4, read after all that (the workers' read-ahead too), reaches each run whole: no run got any of the
    other's batches."""
    servers, trainer_host = two_hosts
    at = servers.address
    dispatcher_command = ["-m", "pipeline.data_service", "--role=dispatcher", "--port=5050"]
    dispatcher_command.append(f"--work_dir={tmp_path / 'journal'}")
    worker = ["-m", "pipeline.data_service", "--role=worker", f"--dispatcher={at}:5050"]
    dispatcher = servers.start(*dispatcher_command)
    hosts.wait_for(dispatcher, "dispatcher serving at", 120)
    workers = [servers.start(*worker, f"--port={port}") for port in (5051, 5052)]
    for process, port in zip(workers, (5051, 5052), strict=True):
        hosts.wait_for(process, rf"worker serving at {re.escape(at)}:{port} ", 120)
    args = [
        f"--data_dir={groups_data}",
        "--epochs=5",
        "--batch_size=4",
        "--learning_rate=0.001",
        "--mirrored_devices=/cpu:0",
    ]
    args.append(f"--data_service=grpc://{at}:5050")
    runs = [trainer_host.start(*TRAIN, *args, f"--model_dir={tmp_path / name}") for name in ("a", "b")]
    try:
        hosts.wait_for(runs[0], r"step 3/78 +epoch 1/5", 300)  # 15, 16, 16, 16 and 15 steps of 4 of the 63 images.
        workers[0].kill()  # Lost for good: never started again.
        workers.append(servers.start(*worker, "--port=5053"))
        hosts.wait_for(workers[-1], rf"worker serving at {re.escape(at)}:5053 ", 120)
        hosts.wait_for(runs[0], r"step 9/78 ", 300)
        workers[1].kill()  # Only the added worker is left.
        hosts.wait_for(runs[0], r"step 20/78 +epoch 2/5", 600)
        dispatcher.kill()
        dispatcher.wait()
        dispatcher = servers.start(*dispatcher_command)  # Its journal in --work_dir: the jobs go on.
        results = [output(run, timeout=600) for run in runs]
    finally:
        _stop(*runs, dispatcher, *workers)
    jobs = []
    for status, printed in results:
        assert status == 0, printed[-3000:]
        assert "epoch 5/5: train loss" in printed and "weights sha256" in printed
        for lossy in (1, 2, 3):
            assert re.search(rf"the tf.data service delivered \d+ of pass {lossy}'s 63 training images", printed)
        assert "the tf.data service delivered 63 of pass 4's 63 training images; 0 missed" in printed, printed[-3000:]
        jobs.append(re.search(r"job (alexnet-[0-9a-f]{12})$", printed, re.M)[1])
    assert jobs[0] != jobs[1]


def test_a_trainer_that_cannot_reach_the_service_workers_says_so_within_a_minute(two_hosts, demo_data, tmp_path):
    """A worker that registered as localhost (TensorFlow's default address): the trainer on another host reaches
    the dispatcher, not the worker, and names the address it tried instead of waiting in silence."""
    servers, trainer_host = two_hosts
    dispatcher = servers.start("-m", "pipeline.data_service", "--role=dispatcher", "--port=5060")
    worker = servers.start(
        "-m",
        "pipeline.data_service",
        "--role=worker",
        "--dispatcher=localhost:5060",
        "--port=5061",
        "--worker_address=localhost:%port%",
    )
    trainer = None
    try:
        hosts.wait_for(worker, "worker serving at localhost:5061", 120)
        trainer = trainer_host.start(
            *TRAIN,
            f"--data_dir={demo_data}",
            f"--model_dir={tmp_path}",
            "--epochs=1",
            "--batch_size=8",
            "--mirrored_devices=/cpu:0",
            f"--data_service=grpc://{servers.address}:5060",
        )
        started = hosts.wait_for(trainer, "Training images from the tf.data service", 300)
        del started
        hosts.wait_for(trainer, r"cannot reach any tf.data service worker \(localhost:5061: .*\) from this host", 120)
    finally:
        _stop(*(p for p in (trainer, worker, dispatcher) if p))


SHAPES = ["worker", "chief"]  # TF_CONFIG by hand (worker tasks only); as Vertex AI and TFJob write it (a chief).


def _tf_config(pair, shape, i):
    """Host i's TF_CONFIG: worker i of two workers, or (shape "chief") the chief and worker 0 as Vertex AI's worker
    pools 0 and 1, and Kubeflow's Chief and Worker replicas, are told."""
    addresses = [f"{host.address}:2222" for host in pair]
    if shape == "worker":
        return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
    task = {"type": "chief", "index": 0} if i == 0 else {"type": "worker", "index": 0}
    return {"cluster": {"chief": addresses[:1], "worker": addresses[1:]}, "task": task}


def _start_workers(pair, args, model_dirs, shape="worker"):
    return [
        host.start(*TRAIN, *args, f"--model_dir={model_dir}", env={"TF_CONFIG": json.dumps(_tf_config(pair, shape, i))})
        for i, (host, model_dir) in enumerate(zip(pair, model_dirs, strict=True))
    ]


@pytest.fixture(scope="module")
def multi_worker(two_hosts, demo_data, tmp_path_factory):
    """(flags, digest of an uninterrupted two-host run): 2 epochs of 7 steps of 8 images, a replica per host."""
    args = [f"--data_dir={demo_data}", "--strategy=multi_worker", "--epochs=2", "--batch_size=8"]
    args.append("--checkpoint_every_steps=3")
    folder = tmp_path_factory.mktemp("uninterrupted")
    results = [output(p, timeout=900) for p in _start_workers(two_hosts, args, [folder] * 2)]
    for status, printed in results:
        assert status == 0, printed[-3000:]
    assert _digest(results[0][1]) == _digest(results[1][1])
    assert "Training on 1 x CPU per worker: 2 replica(s) (CollectiveAllReduceStrategy, 2 worker(s))" in results[0][1]
    return args, _digest(results[0][1])


def _started_again(pair, args, model_dir, uninterrupted, shape="worker"):
    """The job's commands run again to the end: every worker ends with the uninterrupted run's digest. Returns
    what the chief printed."""
    again = [output(p, timeout=900) for p in _start_workers(pair, args, [model_dir] * 2, shape)]
    for status, printed in again:
        assert status == 0, printed[-3000:]
        assert _digest(printed) == uninterrupted
    return again[0][1]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_worker_killed_mid_epoch_and_the_job_started_again_ends_as_if_never_stopped(
    two_hosts, multi_worker, tmp_path, shape
):
    args, uninterrupted = multi_worker
    workers = _start_workers(two_hosts, args, [tmp_path] * 2, shape)
    try:
        hosts.wait_for(workers[0], r"step 5/14", 600)
        workers[1].kill()
        status, printed = output(workers[0], timeout=300)  # The other fails at its next collective.
        assert status == stopping.PEER_LOST_EXIT_CODE and "a worker of this run stopped (" in printed, printed[-3000:]
    finally:
        _stop(*workers)
    chief = _started_again(two_hosts, args, tmp_path, uninterrupted, shape)
    assert re.search(r"Resuming .* at step [3-9]", chief)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".worker", ".claim", ".shared"))]


@pytest.mark.parametrize("shape", SHAPES)
def test_sigterm_to_one_worker_saves_every_worker_at_one_step_and_the_job_resumes_exactly(
    two_hosts, multi_worker, tmp_path, shape
):
    args, uninterrupted = multi_worker
    workers = _start_workers(two_hosts, args, [tmp_path] * 2, shape)
    try:
        hosts.wait_for(workers[0], r"step 4/14", 600)
        workers[1].send_signal(signal.SIGTERM)  # A preemption notice to the host that is not the chief.
        results = [output(p, timeout=300) for p in workers]
    finally:
        _stop(*workers)
    steps = []
    for status, printed in results:
        assert status == 143, printed[-3000:]  # Saved: TFJob's ExitCode policy retries 128-255.
        steps.append(re.search(r"stopped by SIGTERM: saved step (\d+)", printed)[1])
    assert steps[0] == steps[1]
    assert f"at step {steps[0]}:" in _started_again(two_hosts, args, tmp_path, uninterrupted, shape)
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["images"] == 20  # One evaluation, the chief's, of every validation image.


def test_workers_given_folders_of_their_own_are_refused_before_step_1(two_hosts, demo_data, tmp_path):
    args = [f"--data_dir={demo_data}", "--strategy=multi_worker", "--epochs=1", "--batch_size=8"]
    folders = [tmp_path / "host_a", tmp_path / "host_b"]  # Each host's own disk.
    results = [output(p, timeout=600) for p in _start_workers(two_hosts, args, folders)]
    for status, printed in results:
        assert status == 1, printed[-3000:]
        assert "worker(s) 1 cannot see the files the chief (worker 0) writes there" in printed
        assert "one shared folder" in printed and "step 1/" not in printed


HOLD_HOSTS = """
import time
from tests import hosts
with hosts.two_hosts() as pair:
    print(" ".join(host.namespace for host in pair), flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_the_hosts_are_removed_when_the_tests_are_ended_by_a_timeouts_sigterm_or_after_a_kill_9(signum):
    hosts.skip_unless_possible()
    process = subprocess.Popen([sys.executable, "-c", HOLD_HOSTS], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    made = process.stdout.readline().split()
    assert len(made) == 2 and set(made) <= set(hosts.namespaces())
    process.send_signal(signum)
    assert process.wait(timeout=30) == (128 + signum if signum == signal.SIGTERM else -signum)
    if signum == signal.SIGKILL:  # Nothing runs in a process killed -9: the next run's hosts remove them.
        assert set(made) <= set(hosts.namespaces())
        hosts.remove_left_behind()
    assert not set(made) & set(hosts.namespaces())
