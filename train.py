r"""Trains the paper's AlexNet on TFRecord shards made by pipeline.build_tfrecords, then evaluates it (§4.1, §5).

    python train.py --flagfile=configs/paper.flags --data_dir=OUT --model_dir=RUN

Writes to --model_dir: TensorBoard logs, checkpoints (latest and best by validation top-1 error), flags.txt
(the effective flags, to repeat the run with --flagfile) and eval.json (the final 10-crop top-1 / top-5 error).
"""

import json
import math
import os

import keras
import tensorflow as tf
from absl import app, flags

from model import augment, build_alexnet, recipe, summaries
from pipeline import input as data_input

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with the shards, stats.npz and summary.json.", required=True)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Where logs and checkpoints go.", required=True)
_EPOCHS = flags.DEFINE_integer("epochs", 90, "Passes over the training set (§5: roughly 90).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size, split across replicas (§5: 128).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", recipe.LEARNING_RATE, "Initial learning rate (§5: 0.01).")
_MOMENTUM = flags.DEFINE_float("momentum", recipe.MOMENTUM, "SGD momentum (§5: 0.9).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", recipe.WEIGHT_DECAY, "Weight decay, as in §5's update rule.")
_LR_PATIENCE = flags.DEFINE_integer("lr_patience", 5, "Epochs without a better validation error before lr / 10.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0, "Linear lr warm-up steps; 0 as in the paper.")
_LR_DROPS = flags.DEFINE_integer("lr_drops", 3, "How many times the learning rate is divided by 10 at most (§5: 3).")
_WEIGHT_STD = flags.DEFINE_float("weight_std", 0.01, "Std of the N(0, std) weight init (§5: 0.01).")
_DROPOUT = flags.DEFINE_float("dropout", 0.5, "Dropout rate on fc6 and fc7 outputs (§4.2: 0.5).")
_IMAGE_SIZE = flags.DEFINE_enum("image_size", "256", ["256", "128", "64"], "Decode size of the 256x256 images.")
_CROP_SIZE = flags.DEFINE_integer("crop_size", 224, "Training crop (§4.1: 224); 112 for a quick 128 run.")
_LIGHTING_STD = flags.DEFINE_float("lighting_std", augment.LIGHTING_STD, "Std of PCA lighting alphas; 0: off.")
_EVAL_CROPS = flags.DEFINE_enum("eval_crops", "10", ["1", "10"], "Final evaluation: centre crop or §4.1's ten.")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"], "Compute.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into this many logical devices.", lower_bound=1)
_MIRRORED_DEVICES = flags.DEFINE_list("mirrored_devices", [], "MirroredStrategy replicas; default every GPU, or CPUs.")
_TOWER_DEVICES = flags.DEFINE_list("tower_devices", [], "Two devices for towers a and b (§3.2); one replica then.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init, shuffling and augmentation.")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", 20, "Steps between throughput and per-step scalars.")


def make_strategy(*, cpu_devices=1, mirrored_devices=(), tower_devices=()):
    """MirroredStrategy over the given devices (default: all GPUs, else all logical CPUs), or one replica for
    model-parallel towers."""
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if tower_devices:
        if len(tower_devices) != 2 or mirrored_devices:
            raise app.UsageError("--tower_devices takes two devices, and no --mirrored_devices with it")
        return tf.distribute.OneDeviceStrategy(tower_devices[0])
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
        optimizer = recipe.PaperSGD(learning_rate, momentum, weight_decay)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
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
    steps = math.ceil(counts["train"]["written"] / batch_size)
    classifier.fit(train_ds, epochs=epochs, steps_per_epoch=steps, validation_data=val_ds, callbacks=callbacks)
    result = evaluate(preprocess, net, val_ds, crops=eval_crops)
    with tf.summary.create_file_writer(os.path.join(model_dir, "eval")).as_default(step=epochs):
        for key in ("top1_error", "top5_error"):
            tf.summary.scalar(f"{key}_{eval_crops}crop", result[key])
    with tf.io.gfile.GFile(os.path.join(model_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv):
    del argv
    tf.io.gfile.makedirs(_MODEL_DIR.value)
    flags.FLAGS.append_flags_into_file(os.path.join(_MODEL_DIR.value, "flags.txt"))
    strategy = make_strategy(
        cpu_devices=_CPU_DEVICES.value, mirrored_devices=_MIRRORED_DEVICES.value, tower_devices=_TOWER_DEVICES.value
    )
    result = train(
        data_dir=_DATA_DIR.value,
        model_dir=_MODEL_DIR.value,
        epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        learning_rate=_LEARNING_RATE.value,
        momentum=_MOMENTUM.value,
        weight_decay=_WEIGHT_DECAY.value,
        lr_patience=_LR_PATIENCE.value,
        lr_drops=_LR_DROPS.value,
        warmup_steps=_WARMUP_STEPS.value,
        image_size=int(_IMAGE_SIZE.value),
        crop_size=_CROP_SIZE.value,
        lighting_std=_LIGHTING_STD.value,
        eval_crops=int(_EVAL_CROPS.value),
        strategy=strategy,
        precision=_PRECISION.value,
        seed=_SEED.value,
        log_every_steps=_LOG_EVERY.value,
        tower_devices=_TOWER_DEVICES.value or None,
        weight_std=_WEIGHT_STD.value,
        dropout=_DROPOUT.value,
    )
    print(
        f"Validation ({result['images']} images, {result['crops']} crops): "
        f"top-1 error {result['top1_error']:.1%}, top-5 error {result['top5_error']:.1%}"
    )


if __name__ == "__main__":
    app.run(main)
