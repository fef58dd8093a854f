"""Where a run is: the one record the loop advances, and the form a checkpoint holds it in."""

import dataclasses

import numpy as np
import tensorflow as tf

from training import recipe

# What a step reports, summed over the replicas: loss sum, top-1 and top-5 misses, images, stop requests, and the
# images by the pass over the data they are of (PASSES); the SUMS are also summed over an epoch's steps.
# Relative to the step's epoch e, the passes are: before e - 1, e - 1, e, e + 1, and e + 2 or later. A worker's
# own reader reads pass e in epoch e; a tf.data service's stream runs across the epochs (pipeline/reader).
PASSES = ("older", "previous", "this", "next", "later")
METRICS = ("loss", "top1", "top5", "images", "stop", *PASSES)
SUMS = METRICS[:4]


@dataclasses.dataclass(frozen=True)
class Position:
    """Steps done; epochs done (trained, validated, schedule updated); steps done in the current epoch; §5's
    schedule; the current epoch's metric sums so far (SUMS), so a resumed epoch reports as a whole one; and the
    images trained of each pass near the current epoch (PASSES, over every epoch: pass e + 1's images trained in
    epoch e count for it in epoch e + 1), which says at the end of epoch e how much of pass e - 1 was never
    trained."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    plateau: recipe.Plateau = recipe.Plateau()
    epoch_sums: tuple = (0.0,) * len(SUMS)
    passes: tuple = (0.0,) * len(PASSES)

    def after_steps(self, n):
        return dataclasses.replace(self, step=self.step + n, epoch_step=self.epoch_step + n)

    def with_sums(self, sums, passes):
        add = lambda a, b: tuple(float(x + y) for x, y in zip(a, b, strict=True))  # noqa: E731
        return dataclasses.replace(self, epoch_sums=add(self.epoch_sums, sums), passes=add(self.passes, passes))

    def next_epoch(self, plateau):
        """The next epoch's start: pass e - 1's count, reported, is dropped; e + 2 and later count as e + 2."""
        _, _, this, following, later = self.passes
        return Position(self.step, self.epoch + 1, 0, plateau, passes=(0.0, this, following, later, 0.0))


class TrainState(tf.Module):
    """A Position as variables, for tf.train.Checkpoint (beside the weights and momentum)."""

    def __init__(self):
        super().__init__()
        int64 = dict(dtype=tf.int64, trainable=False)
        self.step, self.epoch, self.epoch_step = (tf.Variable(0, **int64) for _ in range(3))
        self.best = tf.Variable(np.inf, dtype=tf.float64, trainable=False)
        self.wait, self.drops = tf.Variable(0, **int64), tf.Variable(0, **int64)
        self.epoch_sums = tf.Variable(np.zeros(len(SUMS)), dtype=tf.float64, trainable=False)
        self.passes = tf.Variable(np.zeros(len(PASSES)), dtype=tf.float64, trainable=False)

    def write(self, position):
        for name in ("step", "epoch", "epoch_step"):
            getattr(self, name).assign(getattr(position, name))
        for name in ("best", "wait", "drops"):
            getattr(self, name).assign(getattr(position.plateau, name))
        self.epoch_sums.assign(position.epoch_sums)
        self.passes.assign(position.passes)

    def read(self):
        plateau = recipe.Plateau(float(self.best.numpy()), int(self.wait.numpy()), int(self.drops.numpy()))
        counts = (int(getattr(self, name).numpy()) for name in ("step", "epoch", "epoch_step"))
        sums, passes = (tuple(float(v) for v in var.numpy()) for var in (self.epoch_sums, self.passes))
        return Position(*counts, plateau, sums, passes)


class TrainStateBeforePasses(tf.Module):
    """TrainState as checkpoints written before PASSES hold it: they restore into this, and the run continues
    with no pass counted (a tf.data service run's next pass report is short by what went before)."""

    def __init__(self, state):
        super().__init__()
        self.step, self.epoch, self.epoch_step = state.step, state.epoch, state.epoch_step
        self.best, self.wait, self.drops, self.epoch_sums = state.best, state.wait, state.drops, state.epoch_sums
