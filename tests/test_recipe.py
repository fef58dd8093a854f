import keras
import numpy as np
import pytest
import tensorflow as tf

from model import recipe


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


def test_top_k_error():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]], np.float32)
    labels = np.array([1, 1, 0])  # Right at top 1; in the top 2 only; in neither.
    top1, top2 = recipe.TopKError(k=1), recipe.TopKError(k=2)
    top1.update_state(labels, logits)
    top2.update_state(labels, logits)
    assert float(top1.result()) == pytest.approx(2 / 3)
    assert float(top2.result()) == pytest.approx(1 / 3)


def test_top_k_error_in_compiled_evaluation_with_static_batches():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 4)).astype(np.float32), rng.integers(0, 10, 96).astype(np.int32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=recipe.metrics())
    logits = model.predict(x, verbose=0)
    expected = {
        k: np.mean([label not in np.argsort(-row)[:k] for row, label in zip(logits, y, strict=True)]) for k in (1, 5)
    }
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)  # Static batch dimension.
    result = model.evaluate(ds, verbose=0, return_dict=True)
    assert result["top1_error"] == pytest.approx(expected[1], abs=1e-6)
    assert result["top5_error"] == pytest.approx(expected[5], abs=1e-6)


def _plateau_lr(errors, mode="auto"):
    """The learning rate after ReduceLROnPlateau (patience 1) sees these validation top-1 errors."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    model.compile(optimizer=recipe.PaperSGD(0.01), loss="sparse_categorical_crossentropy", metrics=recipe.metrics())
    model.evaluate(np.zeros((2, 2)), np.zeros(2), verbose=0)  # Builds the metrics, as fit() does.
    callback = keras.callbacks.ReduceLROnPlateau("val_top1_error", patience=1, mode=mode)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, error in enumerate(errors):
        callback.on_epoch_end(epoch, {"val_top1_error": error})
    return float(model.optimizer.learning_rate.numpy())


def test_plateau_callbacks_minimize_the_error_even_in_auto_mode():
    assert _plateau_lr([0.9, 0.7, 0.5, 0.3]) == pytest.approx(0.01)  # Improving: the rate stays.
    assert _plateau_lr([0.9, 0.7, 0.8]) == pytest.approx(0.001)  # Worse: divided by 10 (§5).
