"""Where a run is: the one record the loop advances, and the form a checkpoint holds it in."""

import dataclasses

import numpy as np
import tensorflow as tf

from training import recipe

# What a step reports, summed over the replicas; the first four are also summed over an epoch's steps.
METRICS = ("loss", "top1", "top5", "images", "stop")  # loss sum, top-1 and top-5 misses, images, stop requests
SUMS = METRICS[:4]


@dataclasses.dataclass(frozen=True)
class Position:
    """Steps done; epochs done (trained, validated, schedule updated); steps done in the current epoch; §5's
    schedule; and the current epoch's metric sums so far (SUMS), so a resumed epoch reports as a whole one."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    plateau: recipe.Plateau = recipe.Plateau()
    epoch_sums: tuple = (0.0,) * len(SUMS)

    def after_steps(self, n):
        """n steps later (n < 0: steps that trained nothing taken back)."""
        return dataclasses.replace(self, step=self.step + n, epoch_step=self.epoch_step + n)

    def with_sums(self, sums):
        return dataclasses.replace(
            self, epoch_sums=tuple(float(a + b) for a, b in zip(self.epoch_sums, sums, strict=True))
        )

    def next_epoch(self, plateau):
        return Position(self.step, self.epoch + 1, 0, plateau)


class TrainState(tf.Module):
    """A Position as variables, for tf.train.Checkpoint (beside the weights and momentum)."""

    def __init__(self):
        super().__init__()
        int64 = dict(dtype=tf.int64, trainable=False)
        self.step, self.epoch, self.epoch_step = (tf.Variable(0, **int64) for _ in range(3))
        self.best = tf.Variable(np.inf, dtype=tf.float64, trainable=False)
        self.wait, self.drops = tf.Variable(0, **int64), tf.Variable(0, **int64)
        self.epoch_sums = tf.Variable(np.zeros(len(SUMS)), dtype=tf.float64, trainable=False)

    def write(self, position):
        for name in ("step", "epoch", "epoch_step"):
            getattr(self, name).assign(getattr(position, name))
        for name in ("best", "wait", "drops"):
            getattr(self, name).assign(getattr(position.plateau, name))
        self.epoch_sums.assign(position.epoch_sums)

    def read(self):
        plateau = recipe.Plateau(float(self.best.numpy()), int(self.wait.numpy()), int(self.drops.numpy()))
        counts = (int(getattr(self, name).numpy()) for name in ("step", "epoch", "epoch_step"))
        return Position(*counts, plateau, tuple(float(v) for v in self.epoch_sums.numpy()))
