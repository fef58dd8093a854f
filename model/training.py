"""The training loop around the paper's model and recipe: replicas, the classifier, fit, and evaluation.

train.py turns flags into one `train(...)` call; tests and notebooks call these functions directly.
"""

import json
import math
import os

import keras
import tensorflow as tf

from model import augment, build_alexnet, recipe, summaries
from pipeline import input as data_input


def make_strategy(*, cpu_devices=1, mirrored_devices=(), tower_devices=()):
    """MirroredStrategy over the given devices (default: all GPUs, else all logical CPUs), or, for model-parallel
    towers, the default strategy: one replica, the model placing its towers itself. (OneDeviceStrategy would
    create every variable on its one device, tower b's too: its device scope is innermost.)"""
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if tower_devices:
        if len(tower_devices) != 2 or mirrored_devices:
            raise ValueError("--tower_devices takes two devices, and no --mirrored_devices with it")
        return tf.distribute.get_strategy()
    devices = mirrored_devices or [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def build_classifier(num_classes, stats, *, image_size, crop_size, lighting_std, precision="float32", **model_kwargs):
    """uint8 images -> logits: on-device preprocessing (§2, §4.1) followed by the AlexNet."""
    preprocess = augment.Preprocess(image_size, crop_size, lighting_std, name="preprocess")
    mean_image = data_input.resize_mean_image(stats["mean_image"], image_size)
    preprocess.set_statistics(mean_image, stats["eigenvalues"], stats["eigenvectors"])
    keras.mixed_precision.set_global_policy(precision)
    try:
        net = build_alexnet(num_classes, input_size=crop_size, **model_kwargs)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    return keras.Model(inputs, net(preprocess(inputs)), name="classifier"), preprocess, net


def make_optimizer(precision, learning_rate, momentum, weight_decay):
    """§5's update rule; under float16, wrapped in dynamic loss scaling (float16 gradients underflow without it)."""
    optimizer = recipe.PaperSGD(learning_rate, momentum, weight_decay)
    return keras.optimizers.LossScaleOptimizer(optimizer) if precision == "mixed_float16" else optimizer


def evaluate(preprocess, net, dataset, *, crops=10):
    """Top-1 and top-5 error over the dataset, averaging softmax over the centre crop or §4.1's ten patches."""

    @tf.function
    def predict(images):
        x = preprocess.normalize(images)
        patches = augment.ten_crops(x, preprocess.crop_size) if crops == 10 else [preprocess(images)]
        return tf.add_n([tf.nn.softmax(tf.cast(net(p, training=False), tf.float32)) for p in patches]) / len(patches)

    errors, count = {1: 0, 5: 0}, 0
    for images, labels in dataset:
        probs = predict(images)
        for k in errors:
            errors[k] += int(tf.reduce_sum(tf.cast(~tf.math.in_top_k(labels, probs, k), tf.int32)))
        count += int(labels.shape[0])
    return {"top1_error": errors[1] / count, "top5_error": errors[5] / count, "images": count, "crops": crops}


def train(
    *,
    data_dir,
    model_dir,
    epochs,
    batch_size,
    learning_rate,
    momentum,
    weight_decay,
    lr_patience,
    lr_drops,
    warmup_steps,
    image_size,
    crop_size,
    lighting_std,
    eval_crops,
    strategy,
    precision="float32",
    seed=0,
    log_every_steps=20,
    **model_kwargs,
):
    """Trains with the paper's recipe; returns the final evaluation dict (also written to eval.json)."""
    keras.utils.set_random_seed(seed)
    train_ds = data_input.dataset(data_dir, "train", batch_size=batch_size, training=True, image_size=image_size)
    val_ds = data_input.dataset(data_dir, "validation", batch_size=batch_size, training=False, image_size=image_size)
    counts, stats = data_input.load_summary(data_dir), data_input.load_stats(data_dir)
    # Keras' evaluate loop (TF 2.21, Keras 3.15) runs a phantom step past the end of a dataset of unknown length:
    # with whole batches it averages in a batch that is not there (measured: 71/512 for 71/384 misses); with a
    # final partial batch under two replicas it stops ("input depth must be evenly divisible by filter depth:
    # 3 vs 48"). So the per-epoch check takes whole batches with explicit steps, repeated because Keras then keeps
    # one iterator across epochs (each epoch takes exactly one pass); the final evaluation sees every image.
    val_batch = min(batch_size, counts["validation"]["written"])
    val_epoch_ds = data_input.dataset(
        data_dir, "validation", batch_size=val_batch, training=False, image_size=image_size, whole_batches=True
    ).repeat()
    with strategy.scope():
        classifier, preprocess, net = build_classifier(
            counts["classes"],
            stats,
            image_size=image_size,
            crop_size=crop_size,
            lighting_std=lighting_std,
            precision=precision,
            **model_kwargs,
        )
        optimizer = make_optimizer(precision, learning_rate, momentum, weight_decay)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        classifier.compile(optimizer=optimizer, loss=loss, metrics=recipe.metrics())
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(model_dir, "backup")),
        recipe.LinearWarmup(warmup_steps),
        # §5: divide by 10 when the validation error stops improving, three times in all.
        keras.callbacks.ReduceLROnPlateau(
            "val_top1_error",
            factor=0.1,
            patience=lr_patience,
            mode="min",
            min_lr=learning_rate * 0.1**lr_drops,
            verbose=1,
        ),
        keras.callbacks.ModelCheckpoint(os.path.join(model_dir, "latest.weights.h5"), save_weights_only=True),
        keras.callbacks.ModelCheckpoint(
            os.path.join(model_dir, "best.weights.h5"),
            "val_top1_error",
            mode="min",
            save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.TensorBoard(model_dir, update_freq=log_every_steps),
        summaries.Summaries(
            model_dir, batch_size=batch_size, sample_images=next(iter(train_ds))[0][:8], every=log_every_steps
        ),
    ]
    classifier.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=math.ceil(counts["train"]["written"] / batch_size),
        validation_data=val_epoch_ds,
        validation_steps=counts["validation"]["written"] // val_batch,
        callbacks=callbacks,
        shuffle=False,  # tf.data shuffles (pipeline/input.py); Keras' default True only warns that it cannot.
        verbose=2,  # One line per epoch: readable in logs and CI.
    )
    result = evaluate(preprocess, net, val_ds, crops=eval_crops)
    with tf.summary.create_file_writer(os.path.join(model_dir, "eval")).as_default(step=epochs):
        for key in ("top1_error", "top5_error"):
            tf.summary.scalar(f"{key}_{eval_crops}crop", result[key])
    with tf.io.gfile.GFile(os.path.join(model_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
