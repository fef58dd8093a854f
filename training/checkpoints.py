"""A run's folder: its checkpoints as training writes and resumes them, its small files written whole, and its
weights loaded into a Classifier (TensorFlow checkpoints, and the Keras `.weights.h5` files that runs wrote
before the training loop kept TensorFlow checkpoints)."""

import json
import os
import re
import time

import h5py
import numpy as np
import tensorflow as tf

from model import classifier
from pipeline import input as data_input
from training.position import TrainState

CHECKPOINTS = "checkpoints"  # The latest few, with everything a resumed run needs.
BEST = "best"  # The weights of the epoch with the lowest validation top-1 error.
# In the .weights.h5 files of the earlier model: Keras named the towers' layers by their position in lists.
_LEGACY_CONV = re.compile(r"layers/alex_net/convs/container(?:_(\d))?/conv2d(_1)?/vars/([01])")
_LEGACY_FC = re.compile(r"layers/alex_net/fcs/container(?:_(\d))?/dense(_1)?/vars/([01])")
_LEGACY_OTHER = {
    "layers/alex_net/fc8/vars/0": "alexnet/fc8/kernel",
    "layers/alex_net/fc8/vars/1": "alexnet/fc8/bias",
    "layers/preprocess/vars/0": "preprocess/mean_image",
    "layers/preprocess/vars/1": "preprocess/eigenvalues",
    "layers/preprocess/vars/2": "preprocess/eigenvectors",
}


class RunCheckpoints:
    """checkpoints/ (the latest few: weights, momentum and the run's Position, all a resumed run needs) and best/
    (the weights of the best validation epoch), saved when config's intervals say. Under several workers each one
    saves (saving may need them all); only the chief's are kept (TensorFlow's guide), the others save to a folder
    of their own and delete it."""

    def __init__(self, config, *, model, optimizer, worker=None):
        self.model_dir, self.config = config.model_dir, config
        self.work_dir = self.model_dir if worker is None else os.path.join(self.model_dir, f".worker-{worker}")
        self.state = TrainState()
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, state=self.state)
        folder = os.path.join(self.work_dir, CHECKPOINTS)
        self.latest = tf.train.CheckpointManager(self.checkpoint, folder, max_to_keep=config.keep_checkpoints)
        best = os.path.join(self.work_dir, BEST)
        self.best = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), best, max_to_keep=1)
        self.last_save = time.monotonic()

    def restore(self):
        """Loads the chief's latest checkpoint, if there is one; returns the Position it holds (step 0 if none)."""
        latest = tf.train.latest_checkpoint(os.path.join(self.model_dir, CHECKPOINTS))
        if latest is not None:
            self.checkpoint.restore(latest).assert_consumed()
        return self.state.read()

    def due(self, step):
        """Whether a periodic checkpoint falls after `step` (every N steps, or N minutes since the last save)."""
        every = self.config.checkpoint_every_steps
        if every and step % every == 0:
            return True
        return time.monotonic() - self.last_save > 60 * self.config.checkpoint_every_minutes

    def save(self, position, best=False):
        """A checkpoint of the run at `position`; best/ first: a run killed between the two saves redoes the
        epoch and saves best/ again."""
        self.state.write(position)
        if best:
            self.best.save(checkpoint_number=position.step)
        self.latest.save(checkpoint_number=position.step)
        if self.work_dir != self.model_dir:
            tf.io.gfile.rmtree(self.work_dir)  # On an object store too (shutil would not reach it).
        self.last_save = time.monotonic()


def write_file(path, text):
    """Writes a whole file or none: to a temporary name, then renamed (a kill mid-write leaves the old file)."""
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        f.write(text)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def resolve(model_dir, which="latest"):
    """The checkpoint to load: 'latest' (of model_dir/checkpoints), 'best' (model_dir/best), or a path (a
    checkpoint prefix, a folder of checkpoints, or a .weights.h5 file)."""
    if which in ("latest", "best"):
        folder = os.path.join(model_dir, CHECKPOINTS if which == "latest" else BEST)
        path = tf.train.latest_checkpoint(folder)
        if path is None:
            raise FileNotFoundError(f"no {which} checkpoint in {folder}: has this run trained an epoch?")
        return path
    if which.endswith(".h5"):
        if not tf.io.gfile.exists(which):
            raise FileNotFoundError(f"--checkpoint={which} does not exist")
        return which
    path = tf.train.latest_checkpoint(which) if tf.io.gfile.isdir(which) else which
    if path is None or not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"--checkpoint={which}: no TensorFlow checkpoint there (expected PREFIX.index)")
    return path


def load(classifier, path):
    """Loads weights (and the statistics the preprocessing layer holds) into a built Classifier."""
    if path.endswith(".h5"):
        return _load_weights_h5(classifier, path)
    tf.train.Checkpoint(model=classifier).restore(path).expect_partial().assert_existing_objects_matched()


def legacy_variable_path(h5_path):
    """The variable path (alexnet/conv3_b/kernel) of a dataset in an earlier run's .weights.h5, or None."""
    for pattern, layer in ((_LEGACY_CONV, "conv{}"), (_LEGACY_FC, "fc{}")):
        match = pattern.fullmatch(h5_path)
        if match:
            index = int(match.group(1) or 0) + (1 if layer == "conv{}" else 6)
            tower = "b" if match.group(2) else "a"
            return f"alexnet/{layer.format(index)}_{tower}/{('kernel', 'bias')[int(match.group(3))]}"
    return _LEGACY_OTHER.get(h5_path)


def _load_weights_h5(classifier, path):
    variables = {v.path: v for v in classifier.weights}
    with h5py.File(tf.io.gfile.GFile(path, "rb"), "r") as f:
        arrays = {}
        f.visititems(lambda name, obj: arrays.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
    found = {legacy_variable_path(name): value for name, value in arrays.items()}
    missing = sorted(set(variables) - set(found))
    if missing:
        raise ValueError(f"{path}: not a weights file of this model (no {', '.join(missing[:3])} ...)")
    for name, variable in variables.items():
        if tuple(variable.shape) != found[name].shape:
            raise ValueError(f"{path}: {name} has shape {found[name].shape}, the model {tuple(variable.shape)}")
        variable.assign(np.asarray(found[name], variable.dtype))


def run_settings(model_dir):
    """(the run's config.json as a dict, its classes [(wnid, name)]), as train.py wrote them into model_dir."""
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--model_dir={model_dir} holds no config.json: is it a train.py run's folder?")
    with tf.io.gfile.GFile(path) as f:
        settings = json.load(f)
    has_labels = tf.io.gfile.exists(os.path.join(model_dir, "labels.txt"))  # Runs before it kept a copy: the data's.
    return settings, data_input.load_labels(model_dir if has_labels else settings["data_dir"])


def restore_classifier(model_dir, which="latest", precision="float32", tower_devices=None):
    """A run's Classifier with the weights and statistics of its checkpoint `which` (resolve); returns
    (model, settings, labels, checkpoint path). Build it under a strategy's scope to place it there."""
    settings, labels = run_settings(model_dir)
    size = settings["image_size"]
    stats = {"mean_image": np.zeros((size, size, 3)), "eigenvalues": np.zeros(3), "eigenvectors": np.eye(3)}
    model = classifier.build_classifier(
        len(labels),
        stats,  # The checkpoint holds the statistics the run trained with.
        image_size=size,
        crop_size=settings["crop_size"],
        lighting_std=settings["lighting_std"],
        precision=precision,
        tower_devices=tower_devices,
    )
    path = resolve(model_dir, which)
    load(model, path)
    return model, settings, labels, path
