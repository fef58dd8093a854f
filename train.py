r"""Trains the paper's AlexNet on TFRecord shards made by pipeline.build_tfrecords, then evaluates it (§4.1, §5).

    python train.py --flagfile=configs/paper.flags --data_dir=OUT --model_dir=RUN

Writes to --model_dir: TensorBoard logs, checkpoints (latest and best by validation top-1 error), flags.txt
(the effective flags, to repeat the run with --flagfile) and eval.json (the final 10-crop top-1 / top-5 error).
"""

import os

import tensorflow as tf
from absl import app, flags

from model import augment, recipe, training

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
_MODEL_FORM = flags.DEFINE_enum(
    "model_form",
    "auto",
    ["auto", "towers", "fused", "grouped"],
    "How the same weights are computed: per tower, or fused into fewer ops (grouped convs: GPUs). auto: grouped on "
    "GPUs without --tower_devices, else towers (fastest on CPU). Checkpoints work across forms.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init, shuffling and augmentation.")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", 20, "Steps between throughput and per-step scalars.")


def main(argv):
    del argv
    tf.io.gfile.makedirs(_MODEL_DIR.value)
    flags.FLAGS.append_flags_into_file(os.path.join(_MODEL_DIR.value, "flags.txt"))
    strategy = training.make_strategy(
        cpu_devices=_CPU_DEVICES.value, mirrored_devices=_MIRRORED_DEVICES.value, tower_devices=_TOWER_DEVICES.value
    )
    result = training.train(
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
        form=_MODEL_FORM.value,
        weight_std=_WEIGHT_STD.value,
        dropout=_DROPOUT.value,
    )
    print(
        f"Validation ({result['images']} images, {result['crops']} crops): "
        f"top-1 error {result['top1_error']:.1%}, top-5 error {result['top5_error']:.1%}"
    )


if __name__ == "__main__":
    app.run(main)
