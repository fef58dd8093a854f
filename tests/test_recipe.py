import keras
import numpy as np
import pytest
import tensorflow as tf

from training import recipe


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_paper_sgd_is_the_papers_update_rule(momentum):
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    w0, b0 = np.linspace(-0.9, 0.8, 6, dtype=np.float32).reshape(3, 2), np.array([0.3, -0.7], np.float32)
    layer.kernel.assign(w0)
    layer.bias.assign(b0)
    lr, decay = 0.1, 0.0005
    opt = recipe.PaperSGD(lr, momentum, decay)
    grads = [np.full((3, 2), 0.5, np.float32), np.full((2,), 0.25, np.float32)]
    # §5: v <- 0.9 v - 0.0005 lr w - lr g; w <- w + v. No decay on biases.
    v_w, v_b = -decay * lr * w0 - lr * grads[0], -lr * grads[1]
    w1, b1 = w0 + v_w, b0 + v_b
    v_w, v_b = momentum * v_w - decay * lr * w1 - lr * grads[0], momentum * v_b - lr * grads[1]
    for _ in range(2):
        opt.apply_gradients(zip(grads, [layer.kernel, layer.bias], strict=False))
    np.testing.assert_allclose(layer.kernel.numpy(), w1 + v_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.bias.numpy(), b1 + v_b, rtol=1e-6, atol=1e-7)


def test_paper_sgd_refuses_nesterov():
    with pytest.raises(ValueError, match="nesterov=True is not supported"):
        recipe.PaperSGD(nesterov=True)


def test_paper_sgd_updates_every_mirrored_replica_with_the_summed_gradient():
    """The fused update writes each replica's own copy of the weights and momentum (a wrong handle would leave
    one copy behind and the replicas would drift apart)."""
    # Not collectives: a second strategy's collective all-reduce in one process collides with the training
    # fixture's (tensorflow/tensorflow#62790, "Shape mismatch in the collective instance 100").
    devices = ["/device:CPU:0", "/device:CPU:1"]
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    w0, lr, decay = np.linspace(-0.9, 0.8, 6, dtype=np.float32).reshape(3, 2), 0.1, 0.0005
    grad = np.full((3, 2), 0.5, np.float32)
    with strategy.scope():
        layer = keras.layers.Dense(2, use_bias=False)
        layer.build((None, 3))
        layer.kernel.assign(w0)
        opt = recipe.PaperSGD(lr, 0.9, decay)
        opt.build([layer.kernel])

    @tf.function
    def step():
        def on_replica():  # Replica r's gradient is (r + 1) grad: the update sees their sum, 3 grad.
            scale = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1, tf.float32)
            opt.apply_gradients([(scale * grad, layer.kernel)])

        strategy.run(on_replica)

    v = -decay * lr * w0 - lr * 3 * grad
    w1 = w0 + v
    v = 0.9 * v - decay * lr * w1 - lr * 3 * grad
    for _ in range(2):
        step()
    for replica_weights in layer.kernel.value.values:
        np.testing.assert_allclose(replica_weights.numpy(), w1 + v, rtol=1e-6, atol=1e-7)
    for replica_momentum in opt.momentums[0].value.values:
        np.testing.assert_allclose(replica_momentum.numpy(), v, rtol=1e-6, atol=1e-7)


def test_top_k_misses():
    from training import evaluation

    probs = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]], np.float32)
    labels = np.array([1, 1, 0])  # Right at top 1; in the top 2 only; in neither.
    np.testing.assert_array_equal(evaluation.top_k_misses(labels, probs, 1).numpy(), [0, 1, 1])
    np.testing.assert_array_equal(evaluation.top_k_misses(labels, probs, 2).numpy(), [0, 0, 1])


def _plateau(errors, patience=1, max_drops=3):
    plateau = recipe.Plateau()
    for error in errors:
        plateau = plateau.update(error, patience, max_drops)
    return plateau


def test_plateau_divides_the_rate_when_the_error_stops_improving():
    assert _plateau([0.9, 0.7, 0.5, 0.3]) == recipe.Plateau(0.3, 0, 0)  # Improving: the rate stays.
    assert _plateau([0.9, 0.7, 0.8]) == recipe.Plateau(0.7, 0, 1)  # Worse once with patience 1: divided (§5).
    assert _plateau([0.9, 0.7, 0.8, 0.75], patience=2) == recipe.Plateau(0.7, 0, 1)
    assert _plateau([0.9, 0.7, 0.7], patience=2) == recipe.Plateau(0.7, 1, 0)  # Equal is not better.
    assert _plateau([0.5] + [0.6] * 10) == recipe.Plateau(0.5, 7, 3)  # At most three times (§5).


def test_learning_rate_is_the_papers_after_the_warm_up_and_each_drop():
    config = recipe.Config(learning_rate=0.01, warmup_steps=4)
    assert [recipe.learning_rate(config, s, 0) for s in range(6)] == pytest.approx(
        [0.002, 0.004, 0.006, 0.008, 0.01, 0.01]
    )
    assert recipe.learning_rate(config, 100, 2) == pytest.approx(0.0001)
    assert recipe.learning_rate(recipe.Config(), 0, 0) == 0.01  # No warm-up in the paper.


def test_linear_scaling_multiplies_the_rate_by_the_batch_over_the_papers_and_warms_up_to_it():
    config = recipe.Config(batch_size=1024, lr_scaling="linear", warmup_steps=3)  # 8 x 128: 8 GPUs at 128 each.
    assert [recipe.learning_rate(config, s, 0) for s in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.08])
    assert recipe.learning_rate(config, 100, 1) == pytest.approx(0.008)  # §5's drops apply to the scaled rate.
    assert recipe.learning_rate(recipe.Config(batch_size=1024), 0, 0) == 0.01  # The paper's rate unless asked.
