r"""The training step as a fraction of this machine's matmul roofline, measured in the same run.

    python benchmarks/training_step.py [--batch_size=128] [--steps=5] [--precisions=float32,mixed_bfloat16]
                                       [--forms=towers,fused]

A training image costs ~4.35 GFLOP (3 x the 1.45 GFLOP forward pass at 224x224). The roofline is the best
tf.matmul rate of the same dtype, measured just before and just after each precision's training runs (the
machine is shared, so only same-run ratios mean anything). The same ratio in GFLOP per CPU-second of the
process does not move with CPU steal (this VM shows up to 100%), but counts TensorFlow's spinning threads.
The model is the paper's: 1000 classes, its init, LRN, dropout and the §5 update rule with weight decay, in
each of --forms (model.alexnet.FORMS).
"""

import time

import keras
import tensorflow as tf
from absl import app, flags

from model import build_alexnet, recipe

GFLOP_PER_IMAGE = 4.35

_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after warm-up.")
_PRECISIONS = flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies to time.")
_FORMS = flags.DEFINE_list("forms", ["towers", "fused"], "Model forms to time (grouped is for GPUs).")


def matmul_peak(dtype, n=4096, repeats=10):
    """(GFLOP/s, GFLOP per CPU-second) of the best of `repeats` n x n matmuls."""
    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    mm = tf.function(lambda x: tf.matmul(x, x))
    mm(a).numpy()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        mm(a).numpy()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
    return 2 * n**3 / best / 1e9, 2 * n**3 / best_cpu / 1e9


def train_rate(precision, form, batch, steps):
    """Training images/s of the paper's model (1000 classes, 224x224) with the paper's update rule."""
    keras.mixed_precision.set_global_policy(precision)
    net = build_alexnet(1000, form=form)
    keras.mixed_precision.set_global_policy("float32")
    optimizer = recipe.PaperSGD()
    x = tf.random.normal((batch, 224, 224, 3), stddev=50.0)
    y = tf.random.uniform((batch,), 0, 1000, tf.int32)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = net(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(logits, tf.float32)))
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        return loss

    step(x, y).numpy()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = step(x, y)
    loss.numpy()
    return batch * steps / (time.perf_counter() - start), batch * steps / (time.process_time() - cpu)


def main(argv):
    del argv
    for precision in _PRECISIONS.value:
        dtype = tf.bfloat16 if "bfloat16" in precision else tf.float16 if "float16" in precision else tf.float32
        before = matmul_peak(dtype)
        rates = {form: train_rate(precision, form, _BATCH.value, _STEPS.value) for form in _FORMS.value}
        after = matmul_peak(dtype)
        peak, peak_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        print(
            f"{precision}: matmul peak {before[0]:.0f} / {after[0]:.0f} GFLOP/s before / after; "
            f"{peak_cpu:.0f} GFLOP per CPU-second"
        )
        for form, (rate, per_cpu) in rates.items():
            achieved = rate * GFLOP_PER_IMAGE
            print(
                f"  {form}: training {rate:.1f} img/s = {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the "
                f"roofline; per CPU-second {per_cpu * GFLOP_PER_IMAGE / peak_cpu:.0%} of the matmul's"
            )


if __name__ == "__main__":
    app.run(main)
