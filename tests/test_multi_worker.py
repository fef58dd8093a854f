"""Several machines: two train.py workers on loopback under MultiWorkerMirroredStrategy."""

import json
import os
import re
import shutil

import pytest

from pipeline.reader import input as data_input
from tests.helpers import TINY_TRAIN_FLAGS, free_ports, output, start
from training import stopping


def _workers(demo_data, model_dir, ports, *extra):
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    args = [
        "train.py",
        f"--data_dir={demo_data}",
        f"--model_dir={model_dir}",
        "--strategy=multi_worker",
        "--epochs=1",
        "--batch_size=16",
        *TINY_TRAIN_FLAGS,
        *extra,
    ]
    processes = [
        start(*args, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(len(ports))
    ]
    return [output(p) for p in processes]


def test_two_workers_train_the_same_weights_and_the_chief_writes_the_outputs(demo_data, tmp_path):
    results = _workers(demo_data, tmp_path, free_ports(2))
    for status, printed in results:
        assert status == 0, printed[-3000:]
    digests = [re.search(r"weights sha256 ([0-9a-f]{16})", printed).group(1) for _, printed in results]
    assert digests[0] == digests[1]  # Every replica applied the same summed gradients.
    chief, other = results[0][1], results[1][1]
    assert (
        "Training on 1 x CPU per worker: 2 replica(s) (CollectiveAllReduceStrategy, 2 worker(s)): batch 16 = 2 x 8"
        in chief
    )
    assert re.search(r"step 3/3 +epoch 1/1", chief) and "step 3/3" not in other  # Only the chief reports.
    outputs = set(os.listdir(tmp_path))
    assert {"checkpoints", "best", "eval.json", "config.json", "flags.txt", "train", "validation", "eval"} <= outputs
    assert not [name for name in outputs if name.startswith(".worker")]  # The other worker's copies are gone.
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["images"] == 20  # Each worker read half of the validation shards; the sum is all.


@pytest.mark.slow
def test_two_workers_fed_by_one_tf_data_service_share_its_stream_and_train_the_same_weights(demo_data, tmp_path):
    """The trainers share the run's job first-come first-served: each takes the batches it reads, and both take
    the epoch's planned steps (63 // 16 = 3), ending with the same weights."""
    dispatcher_port, *worker_ports = free_ports(3)
    journal = tmp_path / "dispatcher"  # Where the dispatcher records the jobs it serves.
    service = [
        start("-m", "pipeline.data_service", "--role=dispatcher", f"--port={dispatcher_port}", f"--work_dir={journal}")
    ]
    service += [
        start(
            "-m",
            "pipeline.data_service",
            "--role=worker",
            f"--dispatcher=localhost:{dispatcher_port}",
            f"--port={port}",
        )
        for port in worker_ports
    ]
    try:
        results = _workers(
            demo_data, tmp_path / "run", free_ports(2), f"--data_service=grpc://localhost:{dispatcher_port}"
        )
    finally:
        for process in service:
            process.kill()
    for status, printed in results:
        assert status == 0, printed[-3000:]
    digests = [re.search(r"weights sha256 ([0-9a-f]{16})", printed).group(1) for _, printed in results]
    assert digests[0] == digests[1]
    chief = results[0][1]
    assert "epoch 1/1: train loss" in chief and re.search(r"step 3/3 +epoch 1/1", chief)
    job = re.search(r"tf.data service at grpc://localhost:\d+: job (alexnet-[0-9a-f]{12})$", chief, re.M)[1]
    recorded = b"".join(path.read_bytes() for path in journal.rglob("journal_*"))
    assert job.encode() in recorded  # The trainers' stream was the dispatcher's job.


@pytest.mark.slow
def test_a_corrupt_shard_one_worker_reads_is_named_by_it_and_the_other_says_why_it_stopped(demo_data, tmp_path):
    """Worker 1's first shard is corrupt: worker 1 names it (its scan looks first at the shards it was reading),
    and worker 0, whose step waits on worker 1 in the all-reduce, says that a worker stopped rather than end in a
    traceback. Worker 1 exits with a refusal's status, which a job manager does not retry (the data needs a
    person); worker 0 with one it retries (its part was not at fault)."""
    data = shutil.copytree(demo_data, tmp_path / "data")
    files = data_input.shard_files(str(data), "train")
    sizes = data_input.shard_sizes(files, data_input.load_summary(str(data)), "train")
    groups, _ = data_input.epoch_plan(sizes, seed=0, epoch=0, step_size=8, pipeline=1, pipelines=2)
    shard = files[groups[0][0]]
    with open(shard, "rb") as f:
        content = bytearray(f.read())
    content[len(content) // 2 : len(content) // 2 + 64] = b"\xff" * 64  # Inside a record: its CRC fails.
    with open(shard, "wb") as f:
        f.write(bytes(content))
    results = _workers(str(data), tmp_path / "run", free_ports(2))
    (chief_status, chief), (other_status, other) = results
    assert other_status == 1 and f"a training shard holds a corrupt record: {shard}, record " in other, other[-3000:]
    assert chief_status == stopping.PEER_LOST_EXIT_CODE == 129 and "Traceback" not in chief, chief[-3000:]
    assert "train.py: a worker of this run stopped (" in chief and "its own output says why" in chief
