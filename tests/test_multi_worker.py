"""Several machines: two train.py workers on loopback under MultiWorkerMirroredStrategy."""

import json
import os
import re

import pytest

from tests.helpers import TINY_TRAIN_FLAGS, free_ports, output, start


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
