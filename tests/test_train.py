import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from model import build_alexnet, training
from model.augment import Preprocess
from pipeline import input as data_input


def _tags(folder):
    tags = {"scalars": set(), "images": set(), "tensors": set()}
    for name in os.listdir(folder):
        acc = event_accumulator.EventAccumulator(os.path.join(folder, name), size_guidance={"tensors": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    return tags


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("model"))
    strategy = tf.distribute.MirroredStrategy(["/device:CPU:0", "/device:CPU:1"])
    result = training.train(
        data_dir=demo_data,
        model_dir=model_dir,
        epochs=2,
        batch_size=16,
        learning_rate=0.01,
        momentum=0.9,
        weight_decay=0.0005,
        lr_patience=1,
        lr_drops=3,
        warmup_steps=2,
        image_size=128,
        crop_size=112,
        lighting_std=0.1,
        eval_crops=10,
        strategy=strategy,
        log_every_steps=2,
    )
    return model_dir, result


def test_training_writes_checkpoints_and_the_final_evaluation(trained, demo_data):
    model_dir, result = trained
    assert {"latest.weights.h5", "best.weights.h5", "eval.json"} <= set(os.listdir(model_dir))
    with open(os.path.join(model_dir, "eval.json")) as f:
        assert json.load(f) == result
    assert result["images"] == 20 and result["crops"] == 10
    assert 0.0 <= result["top1_error"] <= 1.0 and result["top5_error"] <= result["top1_error"]


def test_tensorboard_has_losses_errors_learning_rate_throughput_and_images(trained):
    model_dir, _ = trained
    train_tags, val_tags = _tags(os.path.join(model_dir, "train")), _tags(os.path.join(model_dir, "validation"))
    scalars = train_tags["scalars"] | train_tags["tensors"]
    for tag in ("epoch_loss", "epoch_top1_error", "epoch_top5_error", "epoch_learning_rate", "learning_rate"):
        assert tag in scalars, (tag, scalars)
    assert "throughput/images_per_second" in scalars
    assert {"epoch_loss", "epoch_top1_error"} <= val_tags["scalars"] | val_tags["tensors"]
    images = train_tags["images"] | train_tags["tensors"]
    assert {"conv1_filters", "inputs/augmented"} <= images


def test_ten_crop_evaluation_averages_softmax_over_the_ten_patches():
    preprocess = Preprocess(16, 12, 0.0)
    preprocess.set_statistics(np.zeros((16, 16, 3)), np.ones(3), np.eye(3))

    # A 'network' whose logits favour class 1 when the patch's top-left pixel is bright, else class 0.
    def net(x, training=False):
        bright = tf.cast(x[:, 0, 0, 0] > 100, tf.float32)
        return tf.stack([10 * (1 - bright), 10 * bright], axis=1)

    images = np.zeros((1, 16, 16, 3), np.uint8)
    images[0, 0, 0] = 255  # Only the top-left corner patch sees it: 1 of 10 patches votes 1.
    ds = tf.data.Dataset.from_tensors((images, np.array([1], np.int32)))
    ten = training.evaluate(preprocess, net, ds, crops=10)
    assert ten["top1_error"] == 1.0 and ten["top5_error"] == 0.0
    images[0, 2, 2] = 255  # The centre patch's top-left: the single centre crop now votes 1.
    ds = tf.data.Dataset.from_tensors((images, np.array([1], np.int32)))
    assert training.evaluate(preprocess, net, ds, crops=1)["top1_error"] == 0.0


def test_checkpoint_restores_into_a_model_with_towers_on_two_devices(trained, demo_data):
    model_dir, _ = trained
    stats = data_input.load_stats(demo_data)
    kwargs = dict(image_size=128, crop_size=112, lighting_std=0.1)
    classifier, _, net = training.build_classifier(10, stats, **kwargs, tower_devices=("/CPU:0", "/CPU:1"))
    classifier.load_weights(os.path.join(model_dir, "latest.weights.h5"), skip_mismatch=False)
    plain = build_alexnet(10, input_size=112)
    assert any(not np.array_equal(a, b) for a, b in zip(net.get_weights(), plain.get_weights(), strict=False))


def test_logged_validation_error_is_that_of_the_validation_images(trained, demo_data):
    model_dir, _ = trained
    acc = event_accumulator.EventAccumulator(os.path.join(model_dir, "validation"), size_guidance={"tensors": 0})
    acc.Reload()
    logged = float(tf.make_ndarray(acc.Tensors("epoch_top1_error")[-1].tensor_proto))
    stats = data_input.load_stats(demo_data)
    classifier, preprocess, net = training.build_classifier(10, stats, image_size=128, crop_size=112, lighting_std=0.1)
    classifier.load_weights(os.path.join(model_dir, "latest.weights.h5"))
    whole = data_input.dataset(
        demo_data, "validation", batch_size=16, training=False, image_size=128, whole_batches=True
    )
    expected = training.evaluate(preprocess, net, whole, crops=1)
    assert expected["images"] == 16
    assert logged == pytest.approx(expected["top1_error"], abs=1e-6)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_each_precision_trains_with_float32_weights_and_loss_scaling_for_float16(precision):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    stats = {"mean_image": np.full((256, 256, 3), 120.0), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}
    classifier, _, net = training.build_classifier(
        4, stats, image_size=72, crop_size=64, lighting_std=0.1, precision=precision, weight_std=0.02
    )
    optimizer = training.make_optimizer(precision, 0.01, 0.9, 0.0005)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    classifier.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images = rng.integers(0, 256, (8, 72, 72, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 8).astype(np.int32)
    before = [w.numpy().copy() for w in net.trainable_weights]
    history = classifier.fit(images, labels, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(w.dtype == "float32" for w in net.trainable_weights)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, net.trainable_weights, strict=True)]
    assert all(changed), [w.path for w, c in zip(net.trainable_weights, changed, strict=True) if not c]
    if precision == "mixed_float16":
        assert float(optimizer.dynamic_scale) > 0 and optimizer.inner_optimizer.coupled_decay == 0.0005


def test_fit_with_towers_on_two_devices_trains_every_weight_where_it_lives():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    stats = {"mean_image": np.full((256, 256, 3), 120.0), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}
    devices = ("/device:CPU:0", "/device:CPU:1")
    strategy = training.make_strategy(tower_devices=devices)
    with strategy.scope():
        classifier, _, net = training.build_classifier(
            4, stats, image_size=72, crop_size=64, lighting_std=0.1, weight_std=0.02, tower_devices=devices
        )
        classifier.compile(
            optimizer=training.make_optimizer("float32", 0.01, 0.9, 0.0005),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    images = rng.integers(0, 256, (8, 72, 72, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 8).astype(np.int32)
    before = [w.numpy().copy() for w in net.trainable_weights]
    history = classifier.fit(images, labels, batch_size=4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, net.trainable_weights, strict=True)]
    assert all(changed), [w.path for w, c in zip(net.trainable_weights, changed, strict=True) if not c]
    momentums = classifier.optimizer.momentums
    for w, momentum in zip(net.trainable_weights, momentums, strict=True):  # Momentum lives with its weights.
        expected = "CPU:1" if w.path.split("/")[1].endswith("_b") else "CPU:0"
        assert w.value.device.endswith(expected) and momentum.value.device.endswith(expected), w.path
