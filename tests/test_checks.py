"""Every mistake a user can make before the first training step is a clear error naming the flag or file."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pipeline import example_spec
from pipeline.reader import input as data_input
from tests.helpers import TWO_DEVICES, run
from training import checks, devices, loop, recipe


def _config(data_dir, model_dir, **overrides):
    values = dict(data_dir=str(data_dir), model_dir=str(model_dir), epochs=1, batch_size=16, image_size=64)
    values.update(crop_size=64, mirrored_devices=TWO_DEVICES, eval_crops=1)
    return recipe.Config(**{**values, **overrides})


@pytest.fixture
def data_copy(demo_data, tmp_path):
    """A copy of the demo conversion to break."""
    return shutil.copytree(demo_data, tmp_path / "data")


def _refused(config, *phrases):
    """Refused by the checks every run starts with (loop.start runs them before it builds or writes anything)."""
    with pytest.raises(checks.ConfigError) as error:
        checks.check_config(config)
        checks.check_run(config, devices.make_strategy(config))
    for phrase in phrases:
        assert phrase in str(error.value), str(error.value)


def test_a_refused_run_has_written_nothing(data_copy, tmp_path):
    os.remove(data_copy / "stats.npz")
    with pytest.raises(checks.ConfigError, match="stats.npz is missing"):
        loop.train(_config(data_copy, tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")


def test_a_conversion_by_an_earlier_version_is_refused_naming_what_it_lacks(data_copy, tmp_path):
    summary = json.loads((data_copy / "summary.json").read_text())
    del summary["classes"], summary["train"]["shard_sizes"]
    (data_copy / "summary.json").write_text(json.dumps(summary))
    _refused(_config(data_copy, tmp_path / "m"), "summary.json lacks classes, train.shard_sizes", "run it again")


@pytest.mark.parametrize(
    "flag, value",
    [("batch_size", 0), ("learning_rate", -0.01), ("learning_rate", 0.0), ("epochs", 0), ("log_every_steps", 0)],
)
def test_non_positive_settings(demo_data, tmp_path, flag, value):
    _refused(_config(demo_data, tmp_path, **{flag: value}), f"--{flag}={value}", "must be positive")


def test_crop_larger_than_the_image(demo_data, tmp_path):
    _refused(_config(demo_data, tmp_path, crop_size=96), "--crop_size=96 is larger than --image_size=64")


def test_batch_that_does_not_split_over_the_replicas(demo_data, tmp_path):
    _refused(_config(demo_data, tmp_path, batch_size=127), "--batch_size=127 does not split over 2 replicas")


@pytest.mark.parametrize("devices, missing", [(("/CPU:0", "/CPU:7"), "/CPU:7"), (("/gpu:0", "/gpu:1"), "/gpu:0")])
def test_tower_devices_that_do_not_exist(demo_data, tmp_path, devices, missing):
    config = _config(demo_data, tmp_path, strategy="towers", mirrored_devices=(), tower_devices=devices)
    _refused(config, f"device {missing} does not exist here")


def test_mirrored_devices_that_do_not_exist(demo_data, tmp_path):
    _refused(_config(demo_data, tmp_path, mirrored_devices=("/CPU:0", "/gpu:0")), "device /gpu:0 does not exist")


def test_tower_devices_without_the_towers_strategy(demo_data, tmp_path):
    _refused(_config(demo_data, tmp_path, tower_devices=TWO_DEVICES), "--tower_devices", "--strategy=towers")


def test_no_shards(data_copy, tmp_path):
    for name in os.listdir(data_copy):
        if name.startswith("train-"):
            os.remove(data_copy / name)
    _refused(_config(data_copy, tmp_path / "m"), "no train-*-of-* shards in --data_dir=", "pipeline.build_tfrecords")


@pytest.mark.parametrize("name", ["summary.json", "stats.npz", "labels.txt"])
def test_a_missing_conversion_file(data_copy, tmp_path, name):
    os.remove(data_copy / name)
    _refused(_config(data_copy, tmp_path / "m"), f"{data_copy / name} is missing", "build_tfrecords")


def test_statistics_of_another_image_size(data_copy, tmp_path):
    stats = dict(np.load(data_copy / "stats.npz"))
    stats["mean_image"] = stats["mean_image"][::4, ::4]  # 64x64: made for another size.
    np.savez(data_copy / "stats.npz", **stats)
    _refused(_config(data_copy, tmp_path / "m"), "stats.npz: its mean image is (64, 64), the records are 256x256")


def test_labels_file_and_summary_that_disagree(data_copy, tmp_path):
    with open(data_copy / "labels.txt", "a") as f:
        f.write("n99999999\n")
    _refused(_config(data_copy, tmp_path / "m"), "labels.txt lists 11 classes, summary.json 10")


def test_labels_file_and_records_that_disagree(data_copy, tmp_path):
    lines = (data_copy / "labels.txt").read_text().splitlines()
    (data_copy / "labels.txt").write_text("".join(f"{line}\n" for line in reversed(lines)))
    _refused(_config(data_copy, tmp_path / "m"), "but labels.txt gives that label to", "different conversions")


def test_a_split_with_no_images(data_copy, tmp_path):
    summary = json.loads((data_copy / "summary.json").read_text())
    for name in os.listdir(data_copy):
        if name.startswith("validation-"):
            open(data_copy / name, "wb").close()
    summary["validation"]["shard_sizes"] = [0] * len(summary["validation"]["shard_sizes"])
    (data_copy / "summary.json").write_text(json.dumps(summary))
    _refused(_config(data_copy, tmp_path / "m"), "the validation split has no images")


def test_a_batch_larger_than_the_training_set(demo_data, tmp_path):
    _refused(_config(demo_data, tmp_path, batch_size=128), "--batch_size=128 is more than the 63 training images")


def test_a_loss_that_becomes_nan_stops_the_run(demo_data, tmp_path):
    config = _config(demo_data, tmp_path, learning_rate=1e8, log_every_steps=1)
    with pytest.raises(FloatingPointError, match=r"the loss is not a number at step \d: lower --learning_rate"):
        loop.train(config)
    assert not os.path.exists(tmp_path / "eval.json")


def test_a_corrupt_shard_stops_training_with_its_name_looked_for_where_the_run_was_reading(
    data_copy, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(data_input, "GROUP_SHARDS", 2)  # 8 shards in 4 groups: the one read and the next scanned.
    shard = sorted(p for p in os.listdir(data_copy) if p.startswith("train-"))[1]
    data = bytearray((data_copy / shard).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # Inside a record: its CRC no longer matches.
    (data_copy / shard).write_bytes(bytes(data))
    message = rf"a training shard holds a corrupt record: {data_copy / shard}, record \d+ \(.*corrupted record at"
    with pytest.raises(checks.DataError, match=message):
        loop.train(_config(data_copy, tmp_path / "m"))
    assert re.search(
        r"a training shard failed at step \d+ \(epoch 1\): looking for the bad record in [24] shard",
        capsys.readouterr().out,
    )


def test_a_record_whose_image_does_not_decode_is_named_by_shard_and_index(data_copy, tmp_path):
    """Its CRC is whole (the converter wrote it so, or a disk flipped bits before it was written)."""
    shard = data_copy / sorted(p for p in os.listdir(data_copy) if p.startswith("train-"))[2]
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
    example = tf.train.Example.FromString(records[5])
    example.features.feature[example_spec.ENCODED].bytes_list.value[0] = b"\xff\xd8\xff" + bytes(500)
    records[5] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in records:
            writer.write(record)
    with pytest.raises(checks.DataError, match=rf"holds an image that does not decode: {shard}, record 5 \("):
        loop.train(_config(data_copy, tmp_path / "m"))


def test_shards_holding_fewer_records_than_the_summary_lists_stop_training(data_copy, tmp_path):
    for shard in sorted(p for p in os.listdir(data_copy) if p.startswith("train-"))[:2]:
        (data_copy / shard).write_bytes(b"")  # Whole records gone: readable, but the epoch's plan is short.
    with pytest.raises(checks.DataError, match=r"the training shards ran out at step \d+ \(epoch 1\)"):
        loop.train(_config(data_copy, tmp_path / "m"))


@pytest.mark.slow  # ~26 s; training's shortfall is in the default suite.
def test_a_corrupt_or_short_validation_shard_stops_the_evaluation_with_its_name(data_copy, tmp_path):
    shard = sorted(p for p in os.listdir(data_copy) if p.startswith("validation-"))[0]
    data = (data_copy / shard).read_bytes()
    (data_copy / shard).write_bytes(data[: len(data) // 2] + b"\xff" * 64 + data[len(data) // 2 + 64 :])
    with pytest.raises(checks.DataError, match=f"a validation shard holds a corrupt record: {data_copy / shard}, "):
        loop.train(_config(data_copy, tmp_path / "m"))
    (data_copy / shard).write_bytes(b"")  # Readable, but the images summary.json lists are not all there.
    with pytest.raises(checks.DataError, match=r"the validation shards ran out after \d+ of \d+ images"):
        loop.train(_config(data_copy, tmp_path / "m"))


def test_the_command_exits_non_zero_with_the_message(demo_data, tmp_path):
    result = run("train.py", f"--data_dir={demo_data}", f"--model_dir={tmp_path}", "--learning_rate=-1", "--epochs=1")
    assert result.returncode == 1  # What TFJob's ExitCode policy treats as permanent: a person must act.
    assert result.stderr.strip().splitlines()[-1] == "train.py: --learning_rate=-1.0: must be positive"
    assert not os.path.exists(tmp_path / "flags.txt")  # Refused before anything was written.


def test_config_dataclass_defaults_are_the_papers():
    config = recipe.Config()
    assert (config.batch_size, config.learning_rate, config.momentum, config.weight_decay) == (128, 0.01, 0.9, 0.0005)
    assert (config.epochs, config.lr_drops, config.weight_std, config.dropout) == (90, 3, 0.01, 0.5)
    assert (config.image_size, config.crop_size, config.lighting_std, config.eval_crops) == (256, 224, 0.1, 10)
    assert dataclasses.replace(config, seed=1) != config


def _run_folder(folder, config, labels, **saved):
    """A run folder as train.py leaves it: config.json (with `saved` over config's values) and labels.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**json.loads(json.dumps(config.to_json())), **saved}))
    (folder / "labels.txt").write_text("".join(f"{wnid}\t{name}\n" for wnid, name in labels))


def test_resuming_on_data_of_other_classes_is_refused_before_the_run_folder_is_rewritten(demo_data, tmp_path):
    config = _config(demo_data, tmp_path / "run")
    labels = checks.load_data(config).labels
    other = [("n99999999", "other"), *labels[1:]]
    _run_folder(tmp_path / "run", config, other)
    before = (tmp_path / "run" / "labels.txt").read_text()
    with pytest.raises(checks.ConfigError, match=r"holds other classes .* \(10 classes there, 10 now; label 0 is "):
        loop.train(config)
    assert (tmp_path / "run" / "labels.txt").read_text() == before  # Nothing rewritten.
    _run_folder(tmp_path / "run", config, labels[:9])
    _refused(config, "9 classes there, 10 now; label 9 is none there", f"--data_dir={demo_data})")
    _run_folder(tmp_path / "run", config, labels)
    checks.check_resume(config, config.model_dir, labels)  # The same classes: it continues.


@pytest.mark.parametrize(
    "content, phrase",
    [("{not json", "Expecting property name"), ("[1, 2]", "<class 'list'>"), ("\xff\xfe", "codec can't decode")],
)
def test_a_broken_run_settings_file_is_named_with_what_to_do(demo_data, tmp_path, content, phrase):
    config = _config(demo_data, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(checks.ConfigError) as error:
        checks.check_resume(config, config.model_dir)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'run' / 'config.json'} is not the run's settings") and phrase in message
    assert "start a new run in another --model_dir" in message


def test_a_model_dir_that_is_a_file_is_refused(demo_data, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    _refused(_config(demo_data, tmp_path / "run"), f"--model_dir={tmp_path / 'run'} is a file, not a folder")


def test_a_run_begun_before_a_setting_existed_continues_as_its_default_or_says_what_to_give(demo_data, tmp_path):
    config = _config(demo_data, tmp_path / "run")
    labels = checks.load_data(config).labels
    _run_folder(tmp_path / "run", config, labels)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["lr_scaling"], saved["tower_devices"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    checks.check_resume(config, config.model_dir, labels)  # Their defaults: the run goes on as it was.
    changed = dataclasses.replace(config, lr_scaling="linear")
    with pytest.raises(
        checks.ConfigError, match=r"begun before lr_scaling existed.*continue it with --lr_scaling=none"
    ):
        checks.check_resume(changed, changed.model_dir, labels)
    os.remove(tmp_path / "run" / "labels.txt")
    with pytest.raises(checks.ConfigError, match=f"labels.txt is missing.*--data_dir={demo_data}, copy"):
        checks.check_resume(config, config.model_dir, labels)


@pytest.mark.parametrize(
    "cluster, task, message",
    [
        (
            {"chief": ["a:1"], "worker": ["b:1"], "evaluator": ["c:1"]},
            {"type": "evaluator", "index": 0},
            "this process is TF_CONFIG's evaluator task",
        ),
        (
            {"chief": ["a:1"], "worker": ["b:1"], "ps": ["c:1"]},
            {"type": "worker", "index": 0},
            "TF_CONFIG lists 1 parameter server(s) (ps)",
        ),
    ],
)
def test_tf_config_tasks_the_loop_does_not_run_are_refused_before_anything_is_written(
    demo_data, tmp_path, monkeypatch, cluster, task, message
):
    """As Vertex AI (worker pools 2 and 3) and TFJob (PS, Evaluator replicas) would write them."""
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    config = _config(demo_data, tmp_path / "run", strategy="multi_worker", mirrored_devices=())
    with pytest.raises(checks.ConfigError, match=re.escape(message)):
        loop.train(config)
    assert not (tmp_path / "run").exists()


def test_a_cluster_under_a_one_machine_strategy_is_refused_and_chief_worker_clusters_pass():
    chief_and_worker = json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief"}})
    with pytest.raises(checks.ConfigError, match="lists 2 training tasks, and --strategy=mirrored trains on this"):
        checks.check_cluster(recipe.Config(), chief_and_worker)
    checks.check_cluster(recipe.Config(strategy="multi_worker"), chief_and_worker)
    checks.check_cluster(recipe.Config(), json.dumps({"cluster": {"chief": ["a:1"]}, "task": {"type": "chief"}}))
    with pytest.raises(checks.ConfigError, match="TF_CONFIG is not a JSON object"):
        checks.check_cluster(recipe.Config(), "{cluster")
