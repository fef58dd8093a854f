"""A run's folder: its checkpoints as training writes and resumes them, its small files written whole, and its
weights loaded into a Classifier."""

import os
import time

import numpy as np
import tensorflow as tf

from model import classifier
from pipeline.reader import data as folder
from training import checks
from training.position import TrainState, TrainStateBeforePasses

CHECKPOINTS = "checkpoints"  # The latest few, with everything a resumed run needs.
BEST = "best"  # The weights of the epoch with the lowest validation top-1 error.


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read; the message names the folder."""


class StorageError(RuntimeError):
    """The run's folder is full; the message says how much a checkpoint needs and where the run will continue."""


def newest_first(folder):
    """The checkpoint prefixes in folder (ckpt-N.index there), the highest N first; the state file that names the
    latest is not needed (a kill may have left it behind)."""
    paths = tf.io.gfile.glob(os.path.join(folder, "ckpt-*.index"))
    return sorted((p[: -len(".index")] for p in paths), key=step_of, reverse=True)


def step_of(path):
    """N, of a checkpoint prefix ckpt-N."""
    return int(path.rsplit("-", 1)[1])


def _first_line(error):
    """What an error says, its first line (TensorFlow's messages go on with a traceback of graph nodes)."""
    return (getattr(error, "message", None) or str(error)).strip().splitlines()[0]


def written_before(model_dir, first_epoch_steps):
    """What in a run folder whose checkpoints/ holds no whole checkpoint (no ckpt-N.index) says the run saved
    some: the manager's state file naming some (it is written once a checkpoint is whole), or best/ holding weights
    from after the first epoch (best/ is saved just before checkpoints/ at an epoch's end, so a run killed between
    the two in its first epoch has best/ alone). "" when nothing does: step 0 is where the run is. (A checkpoint's
    data without its index is no sign: a save cut short by a full disk leaves that.)"""
    folder = os.path.join(model_dir, CHECKPOINTS)
    state = tf.train.get_checkpoint_state(folder)  # None when there is none, or it does not parse.
    named = [os.path.basename(p) for p in state.all_model_checkpoint_paths] if state else []
    best = newest_first(os.path.join(model_dir, BEST))
    said = [f"{os.path.join(folder, 'checkpoint')} names {', '.join(named)}"] if named else []
    if best and step_of(best[0]) > first_epoch_steps:
        said.append(f"{best[0]} holds the weights of a later step than the first epoch's {first_epoch_steps}")
    return "; ".join(said)


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
        self.before_passes = tf.train.Checkpoint(
            model=model, optimizer=optimizer, state=TrainStateBeforePasses(self.state)
        )
        folder = os.path.join(self.work_dir, CHECKPOINTS)
        self.latest = tf.train.CheckpointManager(self.checkpoint, folder, max_to_keep=config.keep_checkpoints)
        best = os.path.join(self.work_dir, BEST)
        self.best = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), best, max_to_keep=1)
        self.last_save = time.monotonic()
        variables = (*model.weights, *optimizer.variables)
        self.bytes = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)
        if worker is None:  # What a save cut short (a full disk, a kill) left; it holds space, not a checkpoint.
            for temp in tf.io.gfile.glob(os.path.join(folder, "ckpt-*_temp")):
                tf.io.gfile.rmtree(temp)

    def no_space(self, error):
        """What to say when a write to the run's folder found its disk full."""
        latest = self.latest.latest_checkpoint or next(
            iter(newest_first(os.path.join(self.model_dir, CHECKPOINTS))), None
        )
        where = f"its last checkpoint, {latest}" if latest else "step 0 (no checkpoint was written)"
        message = _first_line(error)
        return (
            f"no space left on the device of --model_dir={self.model_dir} ({message}). A checkpoint needs about "
            f"{self.bytes / 2**20:,.0f} MB, and the run keeps {self.config.keep_checkpoints} and best/: free some "
            f"space (or lower --keep_checkpoints), then the same command continues from {where}"
        )

    def restore(self, first_epoch_steps):
        """Loads the newest of the chief's checkpoints that reads whole; returns the Position it holds (step 0 when
        there is none, and nothing says the run saved one). One that does not (truncated, corrupt) is skipped for
        the one before it, saying so."""
        folder = os.path.join(self.model_dir, CHECKPOINTS)
        found = newest_first(folder)
        for path in found:
            try:
                self._restore(path)
                return self.state.read()
            except (tf.errors.OpError, ValueError, IndexError, AssertionError) as e:
                reason = _first_line(e)[:200]
                print(f"{path} cannot be read ({type(e).__name__}: {reason}): trying the one before it", flush=True)
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {folder} can be read (above): move --model_dir away and "
                "start the run again"
            )
        lost = written_before(self.model_dir, first_epoch_steps)
        if lost:  # Starting at step 0 would train over the run's best/ and its TensorBoard curves.
            raise CheckpointError(
                f"{folder} holds no whole checkpoint, though the run saved some ({lost}): put the folder's files "
                "back (from where it was copied), or move --model_dir away and start the run again (tools.evaluate "
                "and tools.export read best/ with --checkpoint=best)"
            )
        return self.state.read()

    def _restore(self, path):
        """Everything the checkpoint at path holds, checked whole; one written before the pass counts existed
        (training/position.py) restores without them."""
        try:
            self.checkpoint.restore(path).assert_consumed()
        except AssertionError:
            self.before_passes.restore(path).assert_consumed()

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
    checkpoint prefix, or a folder of checkpoints)."""
    if which in ("latest", "best"):
        folder = os.path.join(model_dir, CHECKPOINTS if which == "latest" else BEST)
        path = tf.train.latest_checkpoint(folder)
        if path is None:
            raise FileNotFoundError(f"no {which} checkpoint in {folder}: has this run trained an epoch?")
        return path
    path = tf.train.latest_checkpoint(which) if tf.io.gfile.isdir(which) else which
    if path is None or not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(f"--checkpoint={which}: no TensorFlow checkpoint there (expected PREFIX.index)")
    return path


def load(classifier, path):
    """Loads weights (and the statistics the preprocessing layer holds) into a built Classifier; a checkpoint that
    does not read whole (truncated, corrupt) is a ValueError naming it and the others there."""
    try:
        tf.train.Checkpoint(model=classifier).restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, IndexError) as e:
        reason = _first_line(e)[:200]
        others = [p for p in newest_first(os.path.dirname(path)) if p != path]
        instead = f"--checkpoint={others[0]} (the one before it)" if others else "another --checkpoint"
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {reason}): give {instead}") from None


def run_settings(model_dir):
    """(the run's config.json as a dict, its classes [(wnid, name)]), as train.py wrote them into model_dir."""
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--model_dir={model_dir} holds no config.json: is it a train.py run's folder?")
    settings = checks.read_run_json(path, "the run's settings")
    copy = f"copy the labels.txt of the data the run trained on (--data_dir={settings.get('data_dir')}) there"
    if not tf.io.gfile.exists(os.path.join(model_dir, "labels.txt")):
        raise checks.ConfigError(f"{os.path.join(model_dir, 'labels.txt')} is missing: {copy}")
    return settings, checks.read_run_labels(model_dir, copy)


def restore_classifier(model_dir, which="latest", precision="float32", tower_devices=None):
    """A run's Classifier with the weights and statistics of its checkpoint `which` (resolve); returns
    (model, settings, labels, checkpoint path). Build it under a strategy's scope to place it there."""
    settings, labels = run_settings(model_dir)
    size = settings["image_size"]
    model = classifier.build_classifier(
        len(labels),
        folder.stand_in_stats(size),  # The checkpoint holds the statistics the run trained with.
        image_size=size,
        crop_size=settings["crop_size"],
        lighting_std=settings["lighting_std"],
        precision=precision,
        tower_devices=tower_devices,
    )
    path = resolve(model_dir, which)
    load(model, path)
    return model, settings, labels, path
