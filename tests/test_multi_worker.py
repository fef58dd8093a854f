"""Several machines: two train.py workers on loopback under MultiWorkerMirroredStrategy."""

import json
import os
import re

from tests.helpers import free_ports, output, start


def _workers(demo_data, model_dir, ports):
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    args = [
        "train.py",
        f"--data_dir={demo_data}",
        f"--model_dir={model_dir}",
        "--strategy=multi_worker",
        "--epochs=1",
        "--batch_size=16",
        "--image_size=64",
        "--crop_size=64",
        "--learning_rate=0.005",
        "--weight_std=0.02",
        "--eval_crops=1",
        "--log_every_steps=1",
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
    assert "Training on 2 replica(s) (CollectiveAllReduceStrategy, 2 worker(s)): batch 16 = 2 x 8" in chief
    assert re.search(r"step 3/3 +epoch 1/1", chief) and "step 3/3" not in other  # Only the chief reports.
    outputs = set(os.listdir(tmp_path))
    assert {"checkpoints", "best", "eval.json", "config.json", "flags.txt", "train", "validation", "eval"} <= outputs
    assert not [name for name in outputs if name.startswith(".worker")]  # The other worker's copies are gone.
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["images"] == 20  # Each worker read half of the validation shards; the sum is all.
    again = _workers(demo_data, tmp_path, free_ports(2))  # The whole job, restarted: it resumes (and is done).
    assert all(status == 0 and "nothing to do" in printed for status, printed in again)
