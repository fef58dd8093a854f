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
    assert {"train", "validation", "eval", "flags.txt", "latest.weights.h5"} <= set(os.listdir(model))
