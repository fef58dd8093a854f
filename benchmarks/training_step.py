r"""The training step as a fraction of this machine's matmul roofline, measured in the same run.

    python benchmarks/training_step.py [--batch_size=128] [--rounds=7] [--precisions=float32,mixed_bfloat16]
                                       [--baseline]

A training image costs ~4.35 GFLOP (3 x the 1.45 GFLOP forward pass at 224x224). The roofline is tf.matmul's
rate in the same dtype (4096 x 4096, best of 3). The machine is shared (CPU steal up to 100%, speeds swing 2x
between minutes), so every contestant runs once per round, in turn: the matmul, the plain baseline, then the
paper's model, and each round gives each a fraction of that round's roofline. The report is the median over rounds (and
the range). Two more figures: the median rate over the best matmul of the whole run (the most pessimistic: a
median against a maximum), and the fraction in GFLOP per CPU-second of the process (does not move with steal, but
counts TensorFlow's spinning threads).

The model is the paper's: 1000 classes, its init, LRN, dropout and the §5 update rule with weight decay.
--baseline adds a plain reference: the same two towers as plain Keras layers, without LRN, with Keras' default
init and SGD with momentum, without weight decay. "alexnet / plain" is how much the real model costs over it
(1.00: nothing). "alexnet compiled" is the paper's model with its forward and backward pass compiled by XLA
(train.py --jit_compile).
"""

import statistics
import time

import keras
import tensorflow as tf
from absl import app, flags

from model import build_alexnet
from training import recipe

GFLOP_PER_IMAGE = 4.35
MATMUL_N = 4096

_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed rounds after warm-up; each times every contestant once.")
_PRECISIONS = flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies to time.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also time the plain two-tower Keras model.")


def plain_two_tower(num_classes=1000, input_size=224):
    """The baseline: AlexNet's two towers and shapes as plain Keras layers, no LRN, default init."""
    layers = keras.layers

    def conv(filters, kernel, x, **kwargs):
        return layers.Conv2D(filters, kernel, activation="relu", **kwargs)(x)

    def pool(x):
        return layers.MaxPooling2D(3, 2)(x)

    images = keras.Input((input_size, input_size, 3))
    x = layers.ZeroPadding2D(((1, 2), (1, 2)))(images)
    towers = [pool(conv(128, 5, pool(conv(48, 11, x, strides=4)), padding="same")) for _ in "ab"]
    both = layers.Concatenate()(towers)
    towers = [conv(192, 3, both, padding="same") for _ in "ab"]
    towers = [pool(conv(128, 3, conv(192, 3, t, padding="same"), padding="same")) for t in towers]
    x = layers.Concatenate()([layers.Flatten()(t) for t in towers])
    for _ in ("fc6", "fc7"):
        x = layers.Concatenate()([layers.Dropout(0.5)(layers.Dense(2048, activation="relu")(x)) for _ in "ab"])
    return keras.Model(images, layers.Dense(num_classes)(x))


def matmul_timer(dtype):
    """A callable that runs the best of 3 n x n matmuls and returns the GFLOP they did."""
    a = tf.cast(tf.random.normal((MATMUL_N, MATMUL_N)), dtype)
    mm = tf.function(lambda x: tf.matmul(x, x))
    mm(a).numpy()

    def best_of_3():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            mm(a).numpy()
            best = min(best, time.perf_counter() - start)
        return best, 2 * MATMUL_N**3 / 1e9

    return best_of_3


def step_timer(net, optimizer, batch, jit_compile=False):
    """A callable that runs one training step of `net` and returns (seconds, GFLOP of the step). jit_compile: the
    forward and backward pass as one XLA computation, the update outside it, as train.py --jit_compile does."""
    x = tf.random.normal((batch, 224, 224, 3), stddev=50.0)
    y = tf.random.uniform((batch,), 0, 1000, tf.int32)

    def gradients(x, y):
        with tf.GradientTape() as tape:
            logits = net(x, training=True, seed=tf.constant([0, 1]))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(logits, tf.float32)))
        return loss, tape.gradient(loss, net.trainable_variables)

    gradients = tf.function(gradients, jit_compile=True) if jit_compile else gradients

    @tf.function
    def step(x, y):
        loss, grads = gradients(x, y)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        return loss

    step(x, y).numpy()

    def once():
        start = time.perf_counter()
        step(x, y).numpy()
        return time.perf_counter() - start, batch * GFLOP_PER_IMAGE

    return once


def contestants(precision, batch, baseline):
    """name -> timer; built under the precision's Keras policy."""
    dtype = tf.bfloat16 if "bfloat16" in precision else tf.float16 if "float16" in precision else tf.float32
    timers = {"matmul": matmul_timer(dtype)}
    keras.mixed_precision.set_global_policy(precision)
    try:
        if baseline:
            plain = plain_two_tower()
            assert plain.count_params() == 60_965_224, plain.count_params()  # The paper's count: same shapes.
            paper = recipe.Config()
            timers["plain"] = step_timer(plain, keras.optimizers.SGD(paper.learning_rate, paper.momentum), batch)
        timers["alexnet"] = step_timer(build_alexnet(1000), recipe.PaperSGD(), batch)
        timers["alexnet compiled"] = step_timer(build_alexnet(1000), recipe.PaperSGD(), batch, jit_compile=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return timers


def run_rounds(timers, rounds):
    """Per contestant: per-round GFLOP/s and the process CPU-seconds each took, every contestant once a round."""
    rates = {name: [] for name in timers}
    cpu = dict.fromkeys(timers, 0.0)
    gflop = dict.fromkeys(timers, 0.0)
    for _ in range(rounds):
        for name, timer in timers.items():
            cpu_start = time.process_time()
            seconds, work = timer()
            cpu[name] += time.process_time() - cpu_start
            gflop[name] += work * (3 if name == "matmul" else 1)
            rates[name].append(work / seconds)
    return rates, {name: gflop[name] / cpu[name] for name in timers}


def main(argv):
    del argv
    for precision in _PRECISIONS.value:
        timers = contestants(precision, _BATCH.value, _BASELINE.value)
        rates, per_cpu = run_rounds(timers, _ROUNDS.value)
        peaks = rates.pop("matmul")
        print(
            f"{precision}: matmul roofline {statistics.median(peaks):.0f} GFLOP/s (median of {len(peaks)} rounds, "
            f"{min(peaks):.0f}-{max(peaks):.0f}); {per_cpu['matmul']:.0f} GFLOP per CPU-second"
        )
        fractions = {}
        for name, achieved in rates.items():
            fractions[name] = [a / p for a, p in zip(achieved, peaks, strict=True)]
            median = statistics.median(achieved)
            print(
                f"  {name}: {median / GFLOP_PER_IMAGE:.1f} img/s = {median:.0f} GFLOP/s; "
                f"{statistics.median(fractions[name]):.0%} of the roofline (median of the rounds' fractions, "
                f"{min(fractions[name]):.0%}-{max(fractions[name]):.0%}); {median / max(peaks):.0%} of the run's "
                f"best matmul; per CPU-second {per_cpu[name] / per_cpu['matmul']:.0%} of the matmul's"
            )
        if "plain" in fractions:
            for name in sorted(fractions.keys() - {"plain"}):
                ratios = [a / b for a, b in zip(fractions[name], fractions["plain"], strict=True)]
                print(f"  {name} / plain: {statistics.median(ratios):.2f} (median of the rounds' ratios)")


if __name__ == "__main__":
    app.run(main)
