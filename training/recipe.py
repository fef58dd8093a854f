"""The paper's training recipe (§4-§5): the run's settings, the update rule, the learning-rate schedule."""

import dataclasses
import math

import keras
import tensorflow as tf

STRATEGIES = ("mirrored", "towers", "multi_worker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# auto: NCCL over GPUs; over CPU devices TensorFlow's own choice (one device's sum; a ring across workers).
ALL_REDUCES = ("auto", "nccl", "hierarchical_copy", "one_device", "ring")
LR_SCALINGS = ("none", "linear")
PAPER_BATCH = 128  # §5: the batch its learning rate was set for.


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on. The defaults are the paper's (§4-§5), the one place they live:
    train.py's flags default from them."""

    data_dir: str = ""
    model_dir: str = ""
    # §5: SGD on batches of 128, momentum 0.9, weight decay 0.0005 inside the update, lr 0.01 divided by 10 when
    # the validation error stops improving (three times), ~90 epochs; weights N(0, 0.01).
    epochs: int = 90
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    lr_drops: int = 3
    lr_patience: int = 5  # §5 does not say how long "stopped improving" is: epochs without a new best.
    warmup_steps: int = 0  # Not in the paper: a short run with few classes, or a large batch, needs it (README).
    # Not in the paper: "linear" multiplies learning_rate by batch_size / 128 (Goyal et al. 2017), for the large
    # batches that keep many GPUs busy; with a warm-up of a few epochs.
    lr_scaling: str = "none"
    weight_std: float = 0.01
    dropout: float = 0.5  # §4.2, on fc6 and fc7.
    # §4.1: random 224 crops of the 256 images, mirrored at random, PCA lighting; tested on ten patches.
    image_size: int = 256
    crop_size: int = 224
    lighting_std: float = 0.1
    eval_crops: int = 10
    # How the run is carried out.
    precision: str = "float32"
    jit_compile: bool = False  # Each replica's forward and backward pass as one XLA computation (README, GPUs).
    seed: int = 0
    strategy: str = "mirrored"
    train_on_cpu: bool = False  # mirrored / multi_worker with no GPU in sight: refused unless this says so.
    all_reduce: str = "auto"
    mirrored_devices: tuple[str, ...] = ()
    tower_devices: tuple[str, ...] = ()
    deterministic: bool = True
    data_service: str = ""
    log_every_steps: int = 100
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 10.0
    keep_checkpoints: int = 3
    profile_steps: tuple[int, ...] = ()

    # What a resumed run may change: how it is watched and kept, and how long it goes on.
    RESUMABLE_CHANGES = (
        "data_dir",
        "model_dir",
        "epochs",
        "mirrored_devices",
        "tower_devices",
        "train_on_cpu",
        "all_reduce",
        "jit_compile",
        "data_service",
        "log_every_steps",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "keep_checkpoints",
        "profile_steps",
    )

    def to_json(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def learning_rate(config, step, drops):
    """§5's rate after `drops` divisions by 10 (scaled with the batch under lr_scaling="linear"), ramped up
    linearly over the first warmup_steps steps."""
    warmup = min(1.0, (step + 1) / (config.warmup_steps + 1)) if config.warmup_steps else 1.0
    scale = config.batch_size / PAPER_BATCH if config.lr_scaling == "linear" else 1.0
    return config.learning_rate * scale * 0.1**drops * warmup


@dataclasses.dataclass(frozen=True)
class Plateau:
    """§5's schedule state: the best validation top-1 error so far, epochs since it, divisions done."""

    best: float = math.inf
    wait: int = 0
    drops: int = 0

    def update(self, error, patience, max_drops):
        """After an epoch's validation: a new best resets the wait; `patience` epochs without one divide the
        rate by 10 (at most max_drops times) and start the wait again."""
        if error < self.best:
            return Plateau(error, 0, self.drops)
        if self.wait + 1 >= patience and self.drops < max_drops:
            return Plateau(self.best, 0, self.drops + 1)
        return Plateau(self.best, self.wait + 1, self.drops)


@tf.function(jit_compile=True)
def _momentum_update(var, accum, grad, learning_rate, momentum, decay):
    """accum <- momentum accum - lr (grad + decay var); var <- var + accum, on resource handles in one XLA loop.

    As separate ops (Keras' SGD) it is ~7 passes over memory; fused it reads grad, var and accum once and writes
    var and accum once (README, "Recipe").
    """
    w = tf.raw_ops.ReadVariableOp(resource=var, dtype=grad.dtype)
    v = momentum * tf.raw_ops.ReadVariableOp(resource=accum, dtype=grad.dtype) - learning_rate * (grad + decay * w)
    tf.raw_ops.AssignVariableOp(resource=accum, value=v)
    tf.raw_ops.AssignVariableOp(resource=var, value=w + v)


class PaperSGD(keras.optimizers.SGD):
    """§5: v <- 0.9 v - 0.0005 lr w - lr dL/dw; w <- w + v, the decay on weights (kernels), not biases.

    The decay enters the gradient before the momentum, as in the paper. Keras' SGD(weight_decay=...) is applied
    outside the momentum (decoupled); an L2 kernel regularizer gives this rule at the cost of a pass over every
    weight in the loss.
    The update is one fused op per variable (_momentum_update) on the TensorFlow variables Keras hands to
    update_step (under MirroredStrategy: each replica's copy, inside the strategy's update call).
    """

    def __init__(
        self, learning_rate=Config.learning_rate, momentum=Config.momentum, coupled_decay=Config.weight_decay, **kwargs
    ):
        if kwargs.get("nesterov"):
            raise ValueError("PaperSGD is the paper's plain momentum (§5): nesterov=True is not supported.")
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.coupled_decay = coupled_decay

    def build(self, variables):
        super().build(variables)
        if self.momentum == 0 and not self.momentums:  # Keras keeps none then; the fused update needs one.
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._decayed = [v.path.endswith("kernel") for v in variables]

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if tf.distribute.has_strategy():  # The strategy places each replica's copy.
            return super().add_variable_from_reference(reference_variable, name, initializer)
        # Without a strategy (towers on two devices) Keras builds the optimizer while tracing the train step, and
        # the colocation it asks for is lost when the variable is lifted out of the graph; a device scope is kept.
        # Momentum then lives with its weights, where the fused update reads both.
        with tf.device(getattr(reference_variable, "value", reference_variable).device):
            return super().add_variable_from_reference(reference_variable, name, initializer)

    def update_step(self, gradient, variable, learning_rate):
        # Looked up by index: under MirroredStrategy `variable` is a replica's tf.Variable, without Keras' path.
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        decay = self.coupled_decay if self._decayed[index] else 0.0
        with tf.device(variable.device):  # A compiled op runs where its variables live (towers on two devices).
            _momentum_update(
                variable.handle,
                self.momentums[index].value.handle,  # In the strategy's update call: this replica's copy.
                tf.cast(gradient, dtype),
                tf.cast(learning_rate, dtype),
                tf.constant(self.momentum, dtype),
                tf.constant(decay, dtype),
            )

    def get_config(self):
        return {**super().get_config(), "coupled_decay": self.coupled_decay}
