"""The paper's training recipe (§4-§5): the run's settings, the update rule, the learning-rate schedule."""

import dataclasses
import math

import keras
import tensorflow as tf

from model import alexnet, augment
from pipeline import example_spec

STRATEGIES = ("mirrored", "towers", "multi_worker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# auto: NCCL over GPUs; over CPU devices TensorFlow's own choice (one device's sum; a ring across workers).
ALL_REDUCES = ("auto", "nccl", "hierarchical_copy", "one_device", "ring")
LR_SCALINGS = ("none", "linear")
PAPER_BATCH = 128  # §5: the batch its learning rate was set for.


def _setting(default, help, **flag):
    """A Config field and the flag it becomes (training/flags.py): its help, and choices or required=True."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on. The defaults are the paper's (§4-§5) and each setting's help is here,
    once: train.py's flags are made from these fields (training/flags.py)."""

    data_dir: str = _setting("", "Folder with the shards, stats.npz and summary.json.", required=True)
    model_dir: str = _setting("", "Where logs and checkpoints go.", required=True)
    # §5: SGD on batches of 128, momentum 0.9, weight decay 0.0005 inside the update, lr 0.01 divided by 10 when
    # the validation error stops improving (three times), ~90 epochs.
    epochs: int = _setting(90, "Passes over the training set (§5: roughly 90).")
    batch_size: int = _setting(PAPER_BATCH, "Global batch size, split over the replicas (§5).")
    learning_rate: float = _setting(0.01, "Initial learning rate (§5).")
    momentum: float = _setting(0.9, "SGD momentum (§5).")
    weight_decay: float = _setting(0.0005, "Weight decay, as in §5's update rule.")
    lr_drops: int = _setting(3, "How many times the learning rate is divided by 10 (§5).")
    # §5 does not say how long "stopped improving" is: epochs without a new best.
    lr_patience: int = _setting(5, "Epochs without a better validation error per drop.")
    # Not in the paper: a short run with few classes, or a large batch, needs a warm-up.
    warmup_steps: int = _setting(0, "Linear learning-rate warm-up; 0 in the paper.")
    # Not in the paper: "linear" multiplies learning_rate by batch_size / 128 (Goyal et al. 2017), for the large
    # batches that keep many GPUs busy; with a warm-up of a few epochs.
    lr_scaling: str = _setting(
        "none", "linear: --learning_rate x batch_size / 128, for large batches; none: the paper's.", choices=LR_SCALINGS
    )
    weight_std: float = _setting(alexnet.WEIGHT_STD, "Std of the N(0, std) weight init (§5).")
    dropout: float = _setting(alexnet.DROPOUT, "Dropout rate on fc6 and fc7 outputs (§4.2).")
    # §4.1: random 224 crops of the 256 images, mirrored at random, PCA lighting; tested on ten patches.
    image_size: int = _setting(example_spec.IMAGE_SIZE, "Decode size of the records.", choices=(256, 128, 64))
    crop_size: int = _setting(augment.CROP_SIZE, "Training crop (§4.1: 224); 112 for a quick 128 run.")
    lighting_std: float = _setting(augment.LIGHTING_STD, "Std of the PCA lighting alphas (§4.1); 0: off.")
    eval_crops: int = _setting(10, "Final evaluation: centre or ten (§4.1).", choices=(1, 10))
    # How the run is carried out.
    precision: str = _setting("float32", "Keras dtype policy of the network.", choices=PRECISIONS)
    jit_compile: bool = _setting(
        False, "Each replica's forward and backward pass as one XLA computation (measure first: docs/running.md)."
    )
    seed: int = _setting(0, "Seed of the init, the data order and every random draw.")
    strategy: str = _setting(
        "mirrored",
        "mirrored: a replica per device of this machine; towers: the paper's two towers on --tower_devices (§3.2); "
        "multi_worker: replicas on every machine TF_CONFIG lists.",
        choices=STRATEGIES,
    )
    train_on_cpu: bool = _setting(
        False, "Train on the CPU when no GPU is visible (mirrored, multi_worker); else refused."
    )
    all_reduce: str = _setting(
        "auto",
        "The gradients' all-reduce. auto: NCCL over GPUs; mirrored: nccl, hierarchical_copy, one_device; "
        "multi_worker: nccl, ring.",
        choices=ALL_REDUCES,
    )
    mirrored_devices: tuple[str, ...] = _setting((), "Replicas of --strategy=mirrored; default every GPU.")
    tower_devices: tuple[str, ...] = _setting((), "The two devices of --strategy=towers, e.g. /gpu:0,/gpu:1.")
    deterministic: bool = _setting(True, "Decode in order (exact resume, repeatable).")
    data_service: str = _setting("", "grpc://HOST:PORT of a tf.data service.")
    log_every_steps: int = _setting(100, "Steps between progress lines and scalars.")
    checkpoint_every_steps: int = _setting(0, "Steps between checkpoints (0: by time only).")
    checkpoint_every_minutes: float = _setting(10.0, "Minutes between checkpoints (and one every epoch).")
    keep_checkpoints: int = _setting(3, "Checkpoints kept in --model_dir/checkpoints.")
    profile_steps: tuple[int, ...] = _setting((), "FIRST,LAST: write a profiler trace of these steps.")

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
def momentum_update(var, accum, grad, learning_rate, momentum, decay):
    """accum <- momentum accum - lr (grad + decay var); var <- var + accum, on resource handles in one XLA loop.

    As separate ops (Keras' SGD) it is ~7 passes over memory; fused it reads grad, var and accum once and writes
    var and accum once (docs/choices.md, "Recipe").
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
    The update is one fused op per variable (momentum_update) on the TensorFlow variables Keras hands to
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
            momentum_update(
                variable.handle,
                self.momentums[index].value.handle,  # In the strategy's update call: this replica's copy.
                tf.cast(gradient, dtype),
                tf.cast(learning_rate, dtype),
                tf.constant(self.momentum, dtype),
                tf.constant(decay, dtype),
            )

    def get_config(self):
        return {**super().get_config(), "coupled_decay": self.coupled_decay}
