"""Using a trained run as users do: python -m tools.evaluate, tools.export, tools.predict, tools.neighbours; and
python -m tools.check before a run."""

import glob
import json
import os
import re
import shutil
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from pipeline import demo_data
from pipeline.beam import images
from pipeline.reader import input as data_input
from tests.helpers import TWO_DEVICES, photos_dir, run
from tools import check, serving, similarity
from training import checkpoints, checks, evaluation, recipe

QUIET = ("WARNING", "I0000", "E0000", "W0000", "To enable", "INFO")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export") / "alexnet" / "1"
    keras_file = export_dir.parent.parent / "alexnet.keras"
    model_dir = trained_run[0].model_dir
    result = run(
        "-m", "tools.export", f"--model_dir={model_dir}", f"--export_dir={export_dir}", f"--keras_file={keras_file}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Exported {model_dir}/checkpoints/ckpt-6 to {export_dir}" in result.stdout
    assert f"Saved the network to {keras_file}" in result.stdout
    assert f"Serves images of {serving.Limits().describe()}; others get INVALID_ARGUMENT" in result.stdout
    return export_dir


KERAS_LOAD = """
import sys
import keras, numpy as np
import model  # Registers the project's layers with Keras.
classifier = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], classifier(np.load(sys.argv[2])).numpy())
"""


def test_the_keras_file_loads_with_keras_and_gives_the_checkpoints_logits(exported, trained_run, tmp_path):
    data = checks.load_data(trained_run[0])
    records = data_input.eval_dataset(data.files["validation"], data.sizes["validation"], batch_size=8, image_size=64)
    images = next(iter(records))[0].numpy()
    np.save(tmp_path / "images.npy", images)
    keras_file = exported.parent.parent / "alexnet.keras"
    result = run("-c", KERAS_LOAD, str(keras_file), str(tmp_path / "images.npy"), str(tmp_path / "logits.npy"))
    assert result.returncode == 0, result.stderr[-3000:]
    model, _, _, _ = checkpoints.restore_classifier(trained_run[0].model_dir)
    expected = model(images).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0  # Trained logits, not a constant.


def _val_jpegs(demo_raw):
    return sorted(glob.glob(os.path.join(demo_raw, "val", "*.JPEG")))


def test_evaluate_reports_the_runs_errors_by_class_and_writes_them(trained_run, tmp_path):
    config, final = trained_run
    output = tmp_path / "e.json"
    result = run("-m", "tools.evaluate", f"--model_dir={config.model_dir}", "--cpu_devices=2", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first == (
        f"{config.model_dir}/checkpoints/ckpt-6 on 20 validation images, 10 crop(s): "
        f"top-1 error {final['top1_error']:.1%}, top-5 error {final['top5_error']:.1%}"
    )
    with open(output) as f:
        written = json.load(f)
    for key in ("top1_error", "top5_error", "images", "crops", "per_class"):  # eval.json's keys, and the same values.
        assert written[key] == final[key], key
    assert written["per_class"]["n90000001"]["name"] == "disc" and "worst classes (top-1 error): " in result.stdout


def test_evaluate_gives_the_same_errors_under_every_strategy(trained_run):
    config, final = trained_run
    data = data_input.shard_files(config.data_dir, "validation")
    sizes = data_input.shard_sizes(data, data_input.load_summary(config.data_dir), "validation")
    results = []
    for strategy, tower_devices in (("mirrored", ()), ("towers", TWO_DEVICES)):
        made = checks.strategy_for(strategy, TWO_DEVICES if strategy == "mirrored" else (), tower_devices)
        with made.scope():
            model, settings, labels, _ = checkpoints.restore_classifier(
                config.model_dir, tower_devices=tower_devices or None
            )
        kwargs = dict(batch_size=6, image_size=64, crops=10, labels=labels)
        results.append(evaluation.evaluate(model, made, data, sizes, **kwargs))
    for result in results:
        assert (result["top1_error"], result["top5_error"], result["images"]) == (
            pytest.approx(final["top1_error"]),
            pytest.approx(final["top5_error"]),
            20,
        )


def test_evaluate_on_a_short_shard_names_the_shortfall_instead_of_reporting_on_fewer_images(trained_run, tmp_path):
    config, _ = trained_run
    data = shutil.copytree(config.data_dir, tmp_path / "data")
    shard = sorted(p for p in os.listdir(data) if p.startswith("validation-"))[0]
    (data / shard).write_bytes(b"")
    result = run("-m", "tools.evaluate", f"--model_dir={config.model_dir}", f"--data_dir={data}", "--crops=1")
    assert result.returncode == 1
    assert re.search(r"tools.evaluate: the validation shards ran out after \d+ of 20 images", result.stderr)


def test_evaluate_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    result = run("-m", "tools.evaluate", f"--model_dir={tmp_path}")
    assert result.returncode == 1 and "holds no config.json: is it a train.py run's folder?" in result.stderr


def test_a_run_folders_broken_files_are_named_by_the_tools_with_what_to_do(trained_run, tmp_path):
    config, _ = trained_run
    folder = shutil.copytree(config.model_dir, tmp_path / "run")
    latest, before = checkpoints.newest_first(str(folder / "checkpoints"))[:2]
    with open(latest + ".data-00000-of-00001", "r+b") as f:
        f.truncate(1000)
    cut = rf"{re.escape(latest)} cannot be read \(IndexError: .*\): give --checkpoint={re.escape(before)} \(the one"
    with pytest.raises(ValueError, match=cut):
        checkpoints.restore_classifier(str(folder))
    labels = folder / "labels.txt"
    copy = f"copy the labels.txt of the data the run trained on (--data_dir={config.data_dir}) there"
    labels.write_bytes(b"\xff\xfe")
    with pytest.raises(checks.ConfigError, match=rf"{re.escape(str(labels))} cannot be read \('utf-8' codec"):
        checkpoints.run_settings(str(folder))
    os.remove(labels)
    with pytest.raises(checks.ConfigError, match=re.escape(f"{labels} is missing: {copy}")):
        checkpoints.run_settings(str(folder))
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(checks.ConfigError, match=re.escape(f"{folder / 'config.json'} is not the run's settings")):
        checkpoints.run_settings(str(folder))
    result = run("-m", "tools.predict", f"--export_dir={folder}", "any.jpg")
    assert result.returncode == 1
    assert f"tools.predict: --export_dir={folder} is not a model tools.export wrote (" in result.stderr


def test_the_export_runs_in_plain_tensorflow_without_this_project(exported, demo_raw, tmp_path):
    """A process that cannot import model/ or pipeline/ loads it and serves JPEG and PNG bytes of any size."""
    jpegs = _val_jpegs(demo_raw)[:2]
    png = tmp_path / "image.png"
    png.write_bytes(_png_of(jpegs[0]))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["model"] = sys.modules["pipeline"] = None  # Importing this project now fails.
        import json, tensorflow as tf
        serve = tf.saved_model.load({str(exported)!r}).signatures["serving_default"]
        files = {[*jpegs, str(png)]!r}
        out = serve(image_bytes=tf.constant([open(f, "rb").read() for f in files]))
        print(json.dumps({{k: v.numpy().tolist() for k, v in out.items()}}, default=bytes.decode))
        print(json.dumps({{k: [v.dtype.name, v.shape.as_list()] for k, v in serve.structured_outputs.items()}}))
    """)
    result = run("-c", code, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out, signature = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert signature == {
        "scores": ["float32", [None, 5]],
        "classes": ["int32", [None, 5]],
        "wnids": ["string", [None, 5]],
        "names": ["string", [None, 5]],
    }
    scores = np.array(out["scores"])
    assert scores.shape == (3, 5) and (np.diff(scores, axis=1) <= 0).all() and (scores.sum(axis=1) <= 1 + 1e-6).all()
    classes = {wnid: name for wnid, name, _ in demo_data.CLASSES}
    for wnids, names in zip(out["wnids"], out["names"], strict=True):
        assert [classes[w] for w in wnids] == names
    np.testing.assert_allclose(scores[2], scores[0], atol=0.02)  # The PNG of the first JPEG's pixels.


def _png_of(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path))
    return tf.io.encode_png(image).numpy()


def test_served_preprocessing_is_the_converters_within_a_jpeg_round_trip(demo_raw):
    """§2 in TensorFlow (decode, antialiased bicubic resize, centre crop) against Pillow's in the converter: the
    difference is smaller than what the records' JPEG encoding itself changes."""
    for path in _val_jpegs(demo_raw)[:5]:
        with open(path, "rb") as f:
            data = f.read()
        jpeg, converted = images.convert(data)
        served = serving.decode_and_crop(data).numpy()
        record = tf.io.decode_jpeg(jpeg).numpy().astype(float)
        assert served.shape == (256, 256, 3)
        served_vs_pillow = np.abs(served - converted).mean()
        assert served_vs_pillow < 2.0 and served_vs_pillow < np.abs(record - converted).mean() + 0.5, path


def test_served_preprocessing_on_real_photos_of_every_shape():
    photos = photos_dir()
    for path in sorted(glob.glob(os.path.join(photos, "train", "*", "*.JPEG"))):
        with open(path, "rb") as f:
            data = f.read()
        served = serving.decode_and_crop(data).numpy()
        _, converted = images.convert(data)
        assert np.abs(served - converted).mean() < 3.0, path


def test_predict_prints_the_top_five_and_names_the_files_it_could_not_read(exported, demo_raw, tmp_path):
    good = _val_jpegs(demo_raw)[:2]
    (tmp_path / "notes.JPEG").write_text("not an image")
    thin = tmp_path / "thin.png"  # 1x3000: 91 bytes that the resize would make 256 x 768,000.
    thin.write_bytes(tf.io.encode_png(tf.zeros((3000, 1, 3), tf.uint8)).numpy())
    bad = [str(tmp_path / "notes.JPEG"), "nowhere.jpg", str(thin)]
    result = run("-m", "tools.predict", f"--export_dir={exported}", *good, *bad)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    names = "|".join(name for _, name, _ in demo_data.CLASSES)
    for path, line in zip(good, lines[:2], strict=True):
        assert re.fullmatch(rf"{re.escape(path)}: (({names}) \d+\.\d%(, )?){{5}}", line), line
    assert lines[2] == f"{tmp_path / 'notes.JPEG'}: image_bytes of 12 bytes: not a JPEG, PNG, GIF or BMP"
    assert lines[3].startswith("nowhere.jpg: cannot read it")
    assert lines[4] == f"{thin}: an image of 1x3000 pixels: a side shorter than the 32 px this model serves"
    assert "3 of 5 files could not be predicted" in result.stderr
    assert run("-m", "tools.predict", f"--export_dir={exported}", *good).returncode == 0


def test_nearest_neighbours_are_the_brute_force_ones(trained_run):
    """The streamed top-k equals sorting every training image's fc7 distance (§6.1), computed at once."""
    config, _ = trained_run
    model, _, _, _ = checkpoints.restore_classifier(config.model_dir)
    files = data_input.shard_files(config.data_dir, "train")
    sizes = data_input.shard_sizes(files, data_input.load_summary(config.data_dir), "train")
    every = list(data_input.eval_dataset(files, sizes, batch_size=64, image_size=64).unbatch())
    pixels = np.stack([x.numpy() for x, _, v in every if v])
    queries = pixels[[3, 40]] // 2 + 60  # Not training images themselves.
    distances, found, _ = similarity.nearest(model, tf.constant(queries), files, sizes, k=4, batch_size=16)
    all_features = similarity.features(model, pixels).numpy()
    for q, query_features in enumerate(similarity.features(model, queries).numpy()):
        expected = np.sort(((all_features - query_features) ** 2).sum(axis=1))[:4]
        np.testing.assert_allclose(distances.numpy()[q], expected, rtol=1e-4)
        nearest_pixels = pixels[np.argsort(((all_features - query_features) ** 2).sum(axis=1))[0]]
        np.testing.assert_array_equal(found.numpy()[q, 0], nearest_pixels)


def test_neighbours_writes_figure_4_as_png_and_to_tensorboard(trained_run, demo_raw, tmp_path):
    config, _ = trained_run
    queries = _val_jpegs(demo_raw)[:2]
    output = tmp_path / "figure4.png"
    args = [f"--model_dir={config.model_dir}", f"--images={','.join(queries)}", "--k=3", f"--output={output}"]
    result = run("-m", "tools.neighbours", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    picture = tf.io.decode_png(output.read_bytes()).numpy()
    assert picture.shape == (2 * (64 + 4), 4 * (64 + 4), 3)  # Two rows: the query and 3 neighbours, 4 px apart.
    names = "|".join(name for _, name, _ in demo_data.CLASSES)
    for query, line in zip(queries, result.stdout.splitlines()[:2], strict=True):
        assert re.fullmatch(rf"{re.escape(query)}: (({names}) \(\d+\.\d\)(, )?){{3}}", line), line
    assert "among 63 training images" in result.stdout
    assert tf.io.gfile.glob(os.path.join(config.model_dir, "neighbours", "events.out.tfevents.*"))


def test_check_names_the_devices_times_each_part_and_projects_the_run(demo_data, tmp_path):
    """`python -m tools.check` with train.py's flags, on 2 logical CPU devices: every part runs on each device,
    and the projected epoch is the training images over the slower of the step and the reader."""
    flags = ["--image_size=64", "--crop_size=64", "--batch_size=16", "--cpu_devices=2", "--train_on_cpu", "--epochs=2"]
    result = run(
        "-m", "tools.check", f"--data_dir={demo_data}", f"--model_dir={tmp_path / 'run'}", *flags, "--check_steps=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Devices: 2 x CPU (logical devices of one CPU) (MirroredStrategy)" in out and "PROBLEM" not in out
    for device in ("CPU:0", "CPU:1"):
        line = re.search(
            rf"device:{device}: LRN (\S+) from §3.3's formula, update (\S+) from .*, compiled step runs", out
        )
        assert float(line[1]) < 1e-4 and float(line[2]) < 1e-6
    assert re.search(r"All-reduce of \d+\.\dM gradients \(\d+ MB float32\) over 2 replicas: \d+ ms", out)
    timed = re.search(
        r"Training step \(batch 16, 64x64 crops, float32\): op by op ([\d.]+) images/s, compiled by XLA "
        r"\(--jit_compile\) ([\d.]+) images/s \([\d.]+x\): (give --jit_compile|leave --jit_compile off)",
        out,
    )
    step, compiled = float(timed[1]), float(timed[2])
    assert timed[3] == ("give --jit_compile" if compiled > step else "leave --jit_compile off")
    reader = float(re.search(r"Reader: (\d+) images/s on this host", out)[1])
    bottleneck = re.search(
        r"Bottleneck: (the training step|the reader), ([\d.]+) images/s. An epoch \(63 images\)", out
    )
    assert bottleneck[1] == ("the reader" if reader < step else "the training step")
    assert float(bottleneck[2]) == pytest.approx(min(step, reader), rel=0.01)
    assert not (tmp_path / "run").exists()  # It writes nothing.


@pytest.mark.parametrize(
    "rates, jit_compile, advice",
    [
        ({False: 80.0, True: 40.0}, False, "leave --jit_compile off"),
        ({False: 80.0, True: 40.0}, True, "leave --jit_compile off (these flags have it)"),
        ({False: 10.0, True: 80.0}, False, "give --jit_compile (these flags do not)"),
        ({False: 10.0, True: 80.0}, True, "give --jit_compile"),
    ],
)
def test_check_names_the_faster_step_and_whether_the_flags_have_it(rates, jit_compile, advice):
    config = recipe.Config(batch_size=128, crop_size=224, jit_compile=jit_compile)
    line = check.step_advice(config, rates)
    assert line.endswith(f"({rates[True] / rates[False]:.2f}x): {advice}"), line


def test_check_times_only_the_op_by_op_step_of_the_towers():
    config = recipe.Config(strategy="towers", batch_size=128, crop_size=224)
    assert "not for --strategy=towers" in check.step_advice(config, {False: 50.0})
