"""The demo path through the real commands, on a small demo set: `make test-slow`."""

import json
import os

import pytest

from tests.helpers import run as _run

pytestmark = pytest.mark.slow


def test_demo_data_to_trained_model(tmp_path):
    raw, data, model = tmp_path / "raw", tmp_path / "data", tmp_path / "model"
    result = _run("-m", "pipeline.make_demo_data", f"--output_dir={raw}", "--train_per_class=40", "--val_per_class=10")
    assert result.returncode == 0, result.stderr[-2000:]
    shards = ["--train_shards=4", "--validation_shards=1"]
    result = _run("-m", "pipeline.build_tfrecords", f"--input_dir={raw}", f"--output_dir={data}", *shards)
    assert result.returncode == 0, result.stderr[-2000:]
    result = _run(
        "train.py", "--flagfile=configs/demo.flags", f"--data_dir={data}", f"--model_dir={model}", "--epochs=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1 error" in result.stdout and "top-5 error" in result.stdout
    with open(model / "eval.json") as f:
        assert json.load(f)["images"] == 100
    logs = {"train", "validation", "eval"}
    assert logs | {"flags.txt", "config.json", "labels.txt", "checkpoints", "best"} <= set(os.listdir(model))
    with open(data / "summary.json") as f, open(model / "config.json") as g:
        steps = 2 * (json.load(f)["train"]["written"] // json.load(g)["batch_size"])  # Whole batches, 2 epochs.
    with open(model / "checkpoints" / "checkpoint") as f:  # The last step's checkpoint, for evaluate and export.
        assert f.readline().strip() == f'model_checkpoint_path: "ckpt-{steps}"'
