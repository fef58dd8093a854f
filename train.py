r"""Trains the paper's AlexNet on TFRecord shards made by pipeline.build_tfrecords, then evaluates it (§4.1, §5).

    python train.py --flagfile=configs/paper.flags --data_dir=OUT --model_dir=RUN

Writes to --model_dir: TensorBoard logs, checkpoints/ (the latest few, to resume from), best/ (the weights of the
best validation epoch), flags.txt (the effective flags: --flagfile=RUN/flags.txt repeats the run), config.json
and eval.json (the final top-1 / top-5 error). The same command continues an interrupted run where it stopped.
SIGTERM (a preemption notice) saves a checkpoint a step later and exits with status 42.
"""

import dataclasses
import sys

import tensorflow as tf
from absl import app, flags, logging

from training import checks, devices, loop, recipe

D = recipe.Config()  # The paper's values: the flags' defaults.
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with the shards, stats.npz and summary.json.", required=True)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Where logs and checkpoints go.", required=True)
_EPOCHS = flags.DEFINE_integer("epochs", D.epochs, "Passes over the training set (§5: roughly 90).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", D.batch_size, "Global batch size, split over the replicas (§5).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", D.learning_rate, "Initial learning rate (§5).")
_MOMENTUM = flags.DEFINE_float("momentum", D.momentum, "SGD momentum (§5).")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", D.weight_decay, "Weight decay, as in §5's update rule.")
_LR_DROPS = flags.DEFINE_integer("lr_drops", D.lr_drops, "How many times the learning rate is divided by 10 (§5).")
_LR_PATIENCE = flags.DEFINE_integer("lr_patience", D.lr_patience, "Epochs without a better validation error per drop.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", D.warmup_steps, "Linear learning-rate warm-up; 0 in the paper.")
_LR_SCALING = flags.DEFINE_enum(
    "lr_scaling",
    D.lr_scaling,
    recipe.LR_SCALINGS,
    "linear: --learning_rate x batch_size / 128, for large batches (with a warm-up; README); none: the paper's.",
)
_WEIGHT_STD = flags.DEFINE_float("weight_std", D.weight_std, "Std of the N(0, std) weight init (§5).")
_DROPOUT = flags.DEFINE_float("dropout", D.dropout, "Dropout rate on fc6 and fc7 outputs (§4.2).")
_IMAGE_SIZE = flags.DEFINE_enum("image_size", str(D.image_size), ["256", "128", "64"], "Decode size of the records.")
_CROP_SIZE = flags.DEFINE_integer("crop_size", D.crop_size, "Training crop (§4.1: 224); 112 for a quick 128 run.")
_LIGHTING_STD = flags.DEFINE_float("lighting_std", D.lighting_std, "Std of the PCA lighting alphas (§4.1); 0: off.")
_EVAL_CROPS = flags.DEFINE_enum("eval_crops", str(D.eval_crops), ["1", "10"], "Final evaluation: centre or ten (§4.1).")
_PRECISION = flags.DEFINE_enum("precision", D.precision, recipe.PRECISIONS, "Keras dtype policy of the network.")
_JIT_COMPILE = flags.DEFINE_bool(
    "jit_compile", D.jit_compile, "Each replica's forward and backward pass as one XLA computation (README)."
)
_SEED = flags.DEFINE_integer("seed", D.seed, "Seed of the init, the data order and every random draw.")
_STRATEGY = flags.DEFINE_enum(
    "strategy",
    D.strategy,
    recipe.STRATEGIES,
    "mirrored: a replica per device of this machine; towers: the paper's two towers on --tower_devices (§3.2); "
    "multi_worker: replicas on every machine TF_CONFIG lists.",
)
_TRAIN_ON_CPU = flags.DEFINE_bool(
    "train_on_cpu", D.train_on_cpu, "Train on the CPU when no GPU is visible (mirrored, multi_worker); else refused."
)
_ALL_REDUCE = flags.DEFINE_enum(
    "all_reduce",
    D.all_reduce,
    recipe.ALL_REDUCES,
    "The gradients' all-reduce. auto: NCCL over GPUs; mirrored: nccl, hierarchical_copy, one_device; "
    "multi_worker: nccl, ring.",
)
_MIRRORED_DEVICES = flags.DEFINE_list("mirrored_devices", [], "Replicas of --strategy=mirrored; default every GPU.")
_TOWER_DEVICES = flags.DEFINE_list("tower_devices", [], "The two devices of --strategy=towers, e.g. /gpu:0,/gpu:1.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into this many logical devices.", lower_bound=1)
_OP_DETERMINISM = flags.DEFINE_bool(
    "op_determinism", False, "Deterministic kernels (on GPUs some are not): bit-exact resumes, at some speed."
)
_DETERMINISTIC = flags.DEFINE_bool("deterministic", D.deterministic, "Decode in order (exact resume, repeatable).")
_DATA_SERVICE = flags.DEFINE_string("data_service", D.data_service, "grpc://HOST:PORT of a tf.data service.")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", D.log_every_steps, "Steps between progress lines and scalars.")
_CHECKPOINT_STEPS = flags.DEFINE_integer(
    "checkpoint_every_steps", D.checkpoint_every_steps, "Steps between checkpoints (0: by time only)."
)
_CHECKPOINT_MINUTES = flags.DEFINE_float(
    "checkpoint_every_minutes", D.checkpoint_every_minutes, "Minutes between checkpoints (and one every epoch)."
)
_KEEP = flags.DEFINE_integer("keep_checkpoints", D.keep_checkpoints, "Checkpoints kept in --model_dir/checkpoints.")
_PROFILE = flags.DEFINE_list("profile_steps", [], "FIRST,LAST: write a profiler trace of these steps.")


def config_from_flags():
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(recipe.Config)}
    values.update(image_size=int(values["image_size"]), eval_crops=int(values["eval_crops"]))
    values.update(mirrored_devices=tuple(values["mirrored_devices"]), tower_devices=tuple(values["tower_devices"]))
    try:
        values["profile_steps"] = tuple(int(s) for s in values["profile_steps"])
    except ValueError:
        raise app.UsageError(f"--profile_steps={','.join(values['profile_steps'])}: two step numbers") from None
    return recipe.Config(**values)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # Progress is printed; TensorFlow's INFO lines are noise here.
        logging.set_verbosity(logging.WARNING)
    devices.split_cpu(_CPU_DEVICES.value)  # Before TensorFlow starts its runtime.
    if _OP_DETERMINISM.value:
        tf.config.experimental.enable_op_determinism()
    config = config_from_flags()
    flags_text = "".join(f"{flag.serialize()}\n" for flag in flags.FLAGS.get_flags_for_module(sys.argv[0]))
    try:
        result = loop.train(config, flags_text=flags_text)
    except (checks.ConfigError, checks.DataError, FloatingPointError) as e:
        sys.exit(f"train.py: {e}")
    except loop.Preempted as e:
        print(f"train.py: {e}", flush=True)
        sys.exit(loop.PREEMPTED_EXIT_CODE)
    print(
        f"Validation ({result['images']} images, {result['crops']} crops): "
        f"top-1 error {result['top1_error']:.1%}, top-5 error {result['top5_error']:.1%} "
        f"(weights sha256 {result['weights_sha256'][:16]})"
    )


if __name__ == "__main__":
    app.run(main)
