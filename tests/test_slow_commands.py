"""The trained network's commands on a demo-sized run: `make test-slow`."""

import glob
import json
import os

import pytest

from pipeline.beam import sources
from tests.helpers import run

pytestmark = pytest.mark.slow
# 1,000 images: 15 steps an epoch. Half the demo's batch at half its rate (--lr_scaling=linear): at the demo's rate
# the run can blow up in its first epoch and the plateau schedule then starve it (seen: 84% top-1 error).
TRAIN = ["--epochs=8", "--batch_size=64", "--warmup_steps=16", "--lr_scaling=linear"]


def test_the_export_on_raw_validation_jpegs_errs_as_evaluate_does_on_their_records(tmp_path):
    raw, data, model, export = (tmp_path / name for name in ("raw", "data", "model", "export"))
    steps = [
        ["-m", "pipeline.make_demo_data", f"--output_dir={raw}", "--train_per_class=100", "--val_per_class=20"],
        ["-m", "pipeline.build_tfrecords", f"--input_dir={raw}", f"--output_dir={data}", "--train_shards=4"],
        ["train.py", "--flagfile=configs/demo.flags", f"--data_dir={data}", f"--model_dir={model}", *TRAIN],
        ["-m", "tools.evaluate", f"--model_dir={model}", "--crops=1", f"--output={tmp_path / 'records.json'}"],
        ["-m", "tools.export", f"--model_dir={model}", f"--export_dir={export}"],
    ]
    for args in steps:
        result = run(*args, timeout=1800)  # Eight epochs of 1,000 images took over 10 min on a slow 2-core machine.
        assert result.returncode == 0, (args, result.stderr[-3000:])
    with open(tmp_path / "records.json") as f:
        records = json.load(f)
    assert records["top1_error"] < 0.8  # Chance is 0.9: the network has learned something to compare.
    labels = sources.read_val_labels(str(raw / "validation_labels.txt"))
    files = sorted(glob.glob(str(raw / "val" / "*.JPEG")))
    result = run("-m", "tools.predict", f"--export_dir={export}", *files)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (raw / "LOC_synset_mapping.txt").read_text().splitlines()
    names = dict(line.split(" ", 1) for line in lines)
    top1 = top5 = 0
    for path, line in zip(files, result.stdout.splitlines(), strict=True):
        predicted = [item.rsplit(" ", 1)[0] for item in line.split(": ", 1)[1].split(", ")]
        truth = names[sources.val_wnid(os.path.basename(path), labels)]
        top1 += predicted[0] != truth
        top5 += truth not in predicted
    assert records["images"] == len(files) == 200
    assert abs(top1 / len(files) - records["top1_error"]) <= 0.02
    assert abs(top5 / len(files) - records["top5_error"]) <= 0.02
