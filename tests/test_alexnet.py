import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from model import LocalResponseNorm, alexnet, build_alexnet, lrn
from tests.helpers import TWO_DEVICES

TOWER_LAYER = re.compile(r"(conv[1-5]|fc[67]|lrn[12]|pool[125]|dropout[67])_([ab])(_\d+)?")


@pytest.fixture(scope="module")
def paper_net():
    return build_alexnet(1000)


def test_parameter_count_is_the_papers(paper_net):
    assert paper_net.count_params() == 60_965_224
    per_layer = {name: 0 for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")}
    for w in paper_net.weights:
        per_layer[w.path.split("/")[1].split("_")[0]] += int(np.prod(w.shape))
    assert per_layer == {
        "conv1": 34_944,
        "conv2": 307_456,
        "conv3": 885_120,
        "conv4": 663_936,
        "conv5": 442_624,
        "fc6": 37_752_832,
        "fc7": 16_781_312,
        "fc8": 4_097_000,
    }


def test_kernel_shapes_give_the_papers_tower_connectivity(paper_net):
    shapes = {w.path.split("/", 1)[1]: tuple(w.shape) for w in paper_net.weights if w.path.endswith("kernel")}
    for t in "ab":
        assert shapes[f"conv1_{t}/kernel"] == (11, 11, 3, 48)
        assert shapes[f"conv2_{t}/kernel"] == (5, 5, 48, 128)  # Own tower only.
        assert shapes[f"conv3_{t}/kernel"] == (3, 3, 256, 192)  # Both towers.
        assert shapes[f"conv4_{t}/kernel"] == (3, 3, 192, 192)
        assert shapes[f"conv5_{t}/kernel"] == (3, 3, 192, 128)
        assert shapes[f"fc6_{t}/kernel"] == (9216, 2048)  # 6x6x256 from both towers.
        assert shapes[f"fc7_{t}/kernel"] == (4096, 2048)
    assert shapes["fc8/kernel"] == (4096, 1000)


def test_variables_keep_their_names_and_order(paper_net):
    """Checkpoints and optimizer slots follow these: conv1_a, conv1_b, ..., fc7_b, fc8, kernel before bias."""
    layers = [f"{name}_{t}" for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7") for t in "ab"]
    expected = [f"alexnet/{layer}/{v}" for layer in [*layers, "fc8"] for v in ("kernel", "bias")]
    assert [w.path for w in paper_net.weights] == expected


def test_conv1_gives_55x55_and_the_model_1000_logits(paper_net):
    x = tf.random.normal((1, 224, 224, 3))
    assert paper_net.conv1_a(tf.pad(x, alexnet.CONV1_PAD)).shape == (1, 55, 55, 48)
    assert paper_net(x).shape == (1, 1000)


def test_paper_initialization(paper_net):
    for w in paper_net.weights:
        layer = w.path.split("/")[1].split("_")[0]
        value = w.numpy()
        if w.path.endswith("bias"):
            assert (value == (1.0 if layer in alexnet.ONE_BIAS else 0.0)).all(), w.path
        elif value.size > 30_000:
            assert value.mean() == pytest.approx(0.0, abs=1e-3) and value.std() == pytest.approx(0.01, rel=0.03)


@pytest.mark.parametrize("channels", [48, 128])
def test_lrn_is_the_papers_formula_with_its_channel_edges(channels):
    a = np.random.default_rng(0).uniform(0, 300, size=(2, 3, 3, channels)).astype(np.float64)
    got = LocalResponseNorm()(tf.constant(a, tf.float32)).numpy()
    np.testing.assert_allclose(got, lrn.paper_formula(a), rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_lrn_computes_in_half_precision_within_its_rounding_of_the_formula(dtype):
    """Under mixed precision the layer takes and gives the compute dtype (no float32 round trip), and each output
    is the formula's value at its input rounded once: within half a unit in the last place, the float32 sum
    inside costing nothing visible. The gradient, a difference of two terms, is held to the dtype's step
    relative to its largest value."""
    rng = np.random.default_rng(2)
    x = tf.cast(rng.uniform(0, 300, size=(2, 5, 5, 48)), dtype)  # ReLU outputs of conv1's range.
    g = tf.cast(rng.normal(size=(2, 5, 5, 48)), dtype)
    layer = LocalResponseNorm(dtype=keras.DTypePolicy(f"mixed_{dtype.name}"))
    assert layer.compute_dtype == dtype.name
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    grad = tape.gradient(y, x, output_gradients=g)
    assert y.dtype == grad.dtype == dtype
    a, gs = x.numpy().astype(np.float64), g.numpy().astype(np.float64)
    half_ulp = 2.0 ** -(8 if dtype == tf.bfloat16 else 11)  # 8 and 11 significant bits.
    expected = lrn.paper_formula(a)
    assert (np.abs(y.numpy().astype(np.float64) - expected) <= half_ulp * np.abs(expected)).all()
    expected_grad = lrn.paper_gradient(a, gs)
    error = np.abs(grad.numpy().astype(np.float64) - expected_grad).max() / np.abs(expected_grad).max()
    assert error <= 2 * half_ulp


def test_lrn_is_tensorflows_op_with_the_papers_constants_on_the_relu_of_its_input():
    """The layer takes the convolution's output before its ReLU: the ReLU, then TensorFlow's LRN; the gradient is
    zero where the ReLU was."""
    z = tf.constant(np.random.default_rng(3).normal(0, 100, size=(2, 4, 4, 128)), tf.float32)
    expected = tf.nn.local_response_normalization(tf.nn.relu(z), **lrn.LRN)
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = lrn.relu_and_normalize(z)
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=2e-6)
    grad = tape.gradient(y, z, output_gradients=tf.ones_like(z)).numpy()
    assert (grad[z.numpy() <= 0] == 0).all() and (grad[z.numpy() > 0] != 0).all()


def test_towers_variables_live_on_their_devices():
    net = build_alexnet(10, input_size=112, tower_devices=TWO_DEVICES)
    for w in net.weights:
        tower = w.path.split("/")[1].split("_")[-1]
        expected = TWO_DEVICES[1] if tower == "b" else TWO_DEVICES[0]  # fc8 sits with tower a.
        assert w.value.device.endswith(expected[len("/device:") :]), (w.path, w.value.device)


def test_towers_ops_run_on_their_devices_forward_and_backward():
    net = build_alexnet(10, input_size=112, tower_devices=TWO_DEVICES)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(net(x, training=True, seed=tf.constant([1, 2])))
        return tape.gradient(loss, net.trainable_variables)

    graph = tf.function(step).get_concrete_function(tf.TensorSpec((2, 112, 112, 3))).graph
    placed = {(t, d): set() for t in "ab" for d in ("forward", "backward")}
    layers = set()
    for op in graph.get_operations():
        if op.type in ("Placeholder", "ReadVariableOp"):
            continue  # Variable reads run where the variable lives (previous test).
        for part in op.name.split("/"):
            layer = TOWER_LAYER.fullmatch(part)  # Keras may suffix a scope: conv1_a_1.
            if layer:
                layers.add(layer.group(1))
                placed[layer.group(2), "backward" if op.name.startswith("gradient") else "forward"].add(op.device)
    assert layers == {f"conv{i}" for i in range(1, 6)} | {"fc6", "fc7", "lrn1", "lrn2", "pool1", "pool2", "pool5"} | {
        "dropout6",
        "dropout7",
    }
    # GradientTape places no gradient op by itself: without model/placement.py all of this was the default device.
    for direction in ("forward", "backward"):
        assert placed["a", direction] == {TWO_DEVICES[0]}, direction
        assert placed["b", direction] == {TWO_DEVICES[1]}, direction


def test_same_weights_same_outputs_on_one_device_two_towers_and_mirrored_replicas():
    x = tf.random.normal((2, 112, 112, 3), stddev=50.0)
    single = build_alexnet(10, input_size=112)
    towers = build_alexnet(10, input_size=112, tower_devices=TWO_DEVICES)
    towers.set_weights(single.get_weights())
    expected = single(x).numpy()
    np.testing.assert_allclose(towers(x).numpy(), expected, rtol=1e-4, atol=1e-6)
    strategy = tf.distribute.MirroredStrategy(list(TWO_DEVICES))
    with strategy.scope():
        mirrored = build_alexnet(10, input_size=112)
    mirrored.set_weights(single.get_weights())
    outputs = strategy.experimental_local_results(strategy.run(tf.function(lambda x: mirrored(x)), args=(x,)))
    assert len(outputs) == 2
    for out in outputs:
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_dropout_only_in_training_and_drawn_from_the_seed():
    net = build_alexnet(10, input_size=112)
    x = tf.random.normal((2, 112, 112, 3), stddev=50.0)
    np.testing.assert_array_equal(net(x).numpy(), net(x).numpy())
    seed = tf.constant([3, 4])
    first = net(x, training=True, seed=seed).numpy()
    np.testing.assert_array_equal(net(x, training=True, seed=seed).numpy(), first)
    assert not np.array_equal(net(x, training=True, seed=tf.constant([3, 5])).numpy(), first)
    assert not np.array_equal(net(x, training=True).numpy(), net(x, training=True).numpy())


def test_each_dropout_layer_draws_its_own_mask():
    masks = [
        getattr(alexnet.AlexNet(10), f"dropout{i}_{t}")(tf.ones((4, 64)), training=True, seed=tf.constant([1, 1]))
        for i in (6, 7)
        for t in "ab"
    ]
    assert {m.numpy().tobytes() for m in masks}.__len__() == 4
    for m in masks:  # §4.2: each unit zeroed with probability 0.5, the rest doubled.
        assert set(np.unique(m.numpy())) <= {0.0, 2.0} and 0.3 < (m.numpy() == 0).mean() < 0.7


def _loss_and_grads(net, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(tf.cast(net(x, training=False), tf.float32)))
    grads = tape.gradient(loss, net.trainable_weights)
    return loss, {w.path: g for w, g in zip(net.trainable_weights, grads, strict=True)}


def test_towers_on_two_devices_compute_the_same_function_and_gradients():
    """The placed towers take their own gradients (model/placement.py): the same as one device's, eager and
    compiled."""
    x = tf.random.normal((2, 112, 112, 3), stddev=50.0)
    one = build_alexnet(10, input_size=112)
    placed = build_alexnet(10, input_size=112, tower_devices=TWO_DEVICES)
    placed.set_weights(one.get_weights())
    loss, grads = _loss_and_grads(one, x)
    for run in (_loss_and_grads, tf.function(_loss_and_grads)):
        placed_loss, placed_grads = run(placed, x)
        np.testing.assert_allclose(placed_loss.numpy(), loss.numpy(), rtol=1e-5)
        assert placed_grads.keys() == grads.keys()
        for path, grad in grads.items():
            np.testing.assert_allclose(placed_grads[path].numpy(), grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("precision, dtype", [("mixed_bfloat16", tf.bfloat16), ("mixed_float16", tf.float16)])
def test_mixed_precision_computes_in_half_keeps_float32_variables_and_logits(precision, dtype):
    keras.mixed_precision.set_global_policy(precision)
    try:
        net = build_alexnet(10, input_size=112)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reference = build_alexnet(10, input_size=112)
    reference.set_weights(net.get_weights())
    assert {w.dtype for w in net.weights} == {"float32"}
    assert net.conv2_a.compute_dtype == net.lrn1_a.compute_dtype == net.lrn2_b.compute_dtype == dtype.name
    assert net.fc6_b.compute_dtype == dtype.name and net.fc8.compute_dtype == "float32"
    x = tf.random.normal((2, 112, 112, 3), stddev=50.0)
    graph = tf.function(lambda x: net(x)).get_concrete_function(tf.TensorSpec(x.shape)).graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert convs and {op.get_attr("T") for op in convs} == {dtype}
    casts = [op for op in graph.get_operations() if op.type == "Cast" and op.get_attr("DstT") == tf.float32]
    assert [op.name for op in casts if "lrn" in op.name] == []  # LRN in the compute dtype: no float32 round trip.
    logits = net(x)
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits.numpy(), reference(x).numpy(), rtol=0.1, atol=0.05)
    _, grads = _loss_and_grads(net, x)
    assert all(g.dtype == tf.float32 and np.isfinite(g.numpy()).all() for g in grads.values())


def test_config_round_trip():
    net = alexnet.AlexNet(7, dropout=0.25, weight_std=0.02, tower_devices=TWO_DEVICES)
    clone = alexnet.AlexNet.from_config(net.get_config())
    assert (clone.num_classes, clone.dropout_rate, clone.weight_std) == (7, 0.25, 0.02)
    assert clone.tower_devices == TWO_DEVICES
