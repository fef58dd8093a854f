"""The commands as users type them (subprocesses), on the tiny demo set."""

import json
import os
import re

import pytest

from tests.helpers import run as _run


@pytest.mark.slow  # ~25 s; the DirectRunner's worker processes, also run by make demo.
def test_build_tfrecords_with_parallel_workers(demo_raw, tmp_path):
    out = tmp_path / "out"
    args = ["-m", "pipeline.build_tfrecords", f"--input_dir={demo_raw}", f"--output_dir={out}", "--train_shards=2"]
    result = _run(*args, "--validation_shards=1", "--direct_num_workers=2", "--progress_seconds=0")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["train"]["seen"] == summary["train"]["written"] + summary["train"]["rejected"]
    # Every 0 s: a line per image, each printed once (the runner's relay of the workers' lines is silenced).
    progress = re.findall(r"(train|validation): \d+ images on worker (\d+)/", result.stderr)
    for split in ("train", "validation"):
        assert sum(s == split for s, _ in progress) == summary[split]["seen"], result.stderr[-3000:]
    assert len({pid for _, pid in progress}) == 2  # Both worker processes report.
    assert f"Wrote {out}" in result.stdout
    assert re.search(r"Converted \d+ images in [0-9.]+ s .*: [0-9.]+ images/s", result.stdout), result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output_dir=x"], "--input_dir"),
        (["--input_dir=/nonexistent", "--output_dir=x"], "neither train/<wnid>/ folders nor ILSVRC2012_img_train.tar"),
        (["--input_dir=/nonexistent", "--output_dir=x", "--bogus_flag=1"], "bogus_flag"),
    ],
)
def test_build_tfrecords_bad_flags_are_clear_errors(args, message):
    result = _run("-m", "pipeline.build_tfrecords", *args)
    assert result.returncode != 0 and message in result.stderr


def test_train_without_data_names_the_flag_and_the_fix(tmp_path):
    result = _run("train.py", f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'm'}", "--epochs=1", "--train_on_cpu")
    assert result.returncode != 0 and "pipeline.build_tfrecords" in result.stderr


def test_train_rejects_unknown_flags(tmp_path):
    result = _run("train.py", f"--data_dir={tmp_path}", f"--model_dir={tmp_path}", "--learnin_rate=0.1")
    assert result.returncode != 0 and "learnin_rate" in result.stderr


@pytest.mark.parametrize("name, learning_rate", [("paper.flags", "0.01"), ("demo.flags", "0.005")])
def test_config_files_parse_into_train_flags(name, learning_rate):
    code = (
        "import train; from absl import flags; "
        f"flags.FLAGS(['train.py', '--flagfile=configs/{name}', '--data_dir=d', '--model_dir=m']); "
        "print(flags.FLAGS.learning_rate)"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == learning_rate


def test_make_demo_data_writes_imagenet_layout(tmp_path):
    result = _run(
        "-m", "pipeline.make_demo_data", f"--output_dir={tmp_path}", "--train_per_class=1", "--val_per_class=1"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    train = [f for _, _, files in os.walk(tmp_path / "train") for f in files]
    assert len(train) == 10 + 4  # One per class and the four quirks.
    assert sorted(os.listdir(tmp_path / "val"))[0] == "ILSVRC2012_val_00000001.JPEG"
    with open(tmp_path / "validation_labels.txt") as f:
        assert len(f.read().split()) == 10


@pytest.mark.slow  # ~26 s; the tars path is in the default suite in-process.
def test_downloaded_tars_from_make_demo_data_convert_without_extracting(tmp_path):
    tars, out = tmp_path / "tars", tmp_path / "out"
    args = ["-m", "pipeline.make_demo_data", f"--output_dir={tars}", "--train_per_class=2", "--val_per_class=1"]
    result = _run(*args, "--as_tars")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "LOC_synset_mapping.txt", "validation_labels.txt"]
    assert sorted(os.listdir(tars)) == expected
    args = ["-m", "pipeline.build_tfrecords", f"--input_dir={tars}", f"--output_dir={out}", "--train_shards=2"]
    result = _run(*args, "--validation_shards=1")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert len(summary["train"].pop("shard_sizes")) == 2 and summary["train"].pop("bytes") > 23 * 1000
    assert summary["train"] == {"seen": 24, "written": 23, "rejected": 1, "shards": 2}  # 10 x 2 + 4 quirks.
    assert summary["validation"]["written"] == 10
