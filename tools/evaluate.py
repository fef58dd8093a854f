r"""Top-1 and top-5 error (§6) of a trained run's checkpoint on a whole split: the centre crop or §4.1's ten
patches, with each class's errors and the most confused pairs.

    python -m tools.evaluate --model_dir=RUN [--data_dir=DATA] [--checkpoint=latest|best|PATH] [--crops=10]
                             [--output=FILE.json] [--strategy=mirrored|towers|multi_worker ...]

DATA defaults to the run's own --data_dir; PATH is a checkpoint prefix or a folder of checkpoints. Runs batched over
the replicas of the strategy given, as training does (train.py ends with the same evaluation). Writes FILE.json
(default RUN/evaluation-CHECKPOINT-Ncrop.json).
"""

import json
import os
import sys

import tensorflow as tf
from absl import app, flags

from pipeline.reader import input as data_input
from training import checkpoints, checks, devices, evaluation, recipe

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "The run's folder (train.py's --model_dir).", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Converted data; default: the run's.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a checkpoint path.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "train"], "Which split to evaluate on.")
_CROPS = flags.DEFINE_enum("crops", "10", ["1", "10"], "Centre crop, or §4.1's ten patches (averaged softmax).")
_OUTPUT = flags.DEFINE_string("output", None, "Where the JSON goes; default RUN/evaluation-CHECKPOINT-Ncrop.json.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch; default: the run's.")
_STRATEGY = flags.DEFINE_enum("strategy", "mirrored", recipe.STRATEGIES, "As train.py's.")
_MIRRORED_DEVICES = flags.DEFINE_list("mirrored_devices", [], "As train.py's.")
_TOWER_DEVICES = flags.DEFINE_list("tower_devices", [], "As train.py's.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into this many logical devices.", lower_bound=1)


def report(result, labels, worst=5):
    """The lines a user reads: the errors, the worst classes and the most confused pairs, by name."""
    names = dict(labels)
    per_class = sorted(result["per_class"].items(), key=lambda item: -(item[1]["top1_error"] or 0))
    worst_classes = ", ".join(f"{c['name']} {c['top1_error']:.1%}" for _, c in per_class[:worst])
    confused = ", ".join(
        f"{names[p['true']]} -> {names[p['predicted']]} {p['count']}" for p in result["most_confused"][:worst]
    )
    return [
        f"{result['checkpoint']} on {result['images']} {result['split']} images, {result['crops']} crop(s): "
        f"top-1 error {result['top1_error']:.1%}, top-5 error {result['top5_error']:.1%}",
        f"  worst classes (top-1 error): {worst_classes}",
        f"  most confused (true -> predicted, images): {confused or 'none'}",
    ]


def main(argv):
    del argv
    devices.split_cpu(_CPU_DEVICES.value)
    try:
        settings, labels = checkpoints.run_settings(_MODEL_DIR.value)
        strategy = checks.strategy_for(_STRATEGY.value, _MIRRORED_DEVICES.value, _TOWER_DEVICES.value)
        batch_size = _BATCH_SIZE.value or settings["batch_size"]
        checks.check_batch(recipe.Config(batch_size=batch_size), strategy.num_replicas_in_sync)
        data_dir = _DATA_DIR.value or settings["data_dir"]
        if [w for w, _ in data_input.load_labels(data_dir)] != [w for w, _ in labels]:
            raise checks.ConfigError(f"--data_dir={data_dir} has other classes than the run in {_MODEL_DIR.value}")
        files = data_input.shard_files(data_dir, _SPLIT.value)
        sizes = data_input.shard_sizes(files, data_input.load_summary(data_dir), _SPLIT.value)
        with strategy.scope():
            model, _, _, path = checkpoints.restore_classifier(
                _MODEL_DIR.value, _CHECKPOINT.value, settings["precision"], tuple(_TOWER_DEVICES.value) or None
            )
    except (checks.ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"tools.evaluate: {e}")
    crops = int(_CROPS.value)
    kwargs = dict(batch_size=batch_size, image_size=settings["image_size"], crops=crops, labels=labels)
    try:
        result = evaluation.evaluate(model, strategy, files, sizes, split=_SPLIT.value, **kwargs)
    except checks.DataError as e:
        sys.exit(f"tools.evaluate: {e}")
    result.update(checkpoint=path, split=_SPLIT.value, data_dir=data_dir)
    output = _OUTPUT.value or os.path.join(_MODEL_DIR.value, f"evaluation-{os.path.basename(path)}-{crops}crop.json")
    with tf.io.gfile.GFile(output, "w") as f:
        json.dump(result, f, indent=2)
    print("\n".join([*report(result, labels), f"Wrote {output}"]))


if __name__ == "__main__":
    app.run(main)
