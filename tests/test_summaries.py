import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from training import summaries


def _written(folder, write):
    """{tag: the [k, 3] table} of the histograms `write()` puts in a fresh event file under folder."""
    writer = tf.summary.create_file_writer(str(folder))
    with writer.as_default(step=3):
        write()
    writer.flush()
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: tf.make_ndarray(acc.Tensors(tag)[0].tensor_proto) for tag in acc.Tags()["tensors"]}


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).normal(0, 0.01, (61, 47)).astype(np.float32),  # A layer's weights.
        np.linspace(-1, 1, 1000, dtype=np.float32),  # The maximum falls in the last bucket, as TensorBoard's.
        np.ones((4, 4), np.float32),  # One value: every edge there, everything in the last bucket.
    ],
    ids=["weights", "edges", "one value"],
)
def test_histograms_are_tensorboards_own(values, tmp_path):
    """The same [left, right, count] table as tf.summary.histogram, read back by TensorBoard's own reader."""
    ours = _written(tmp_path / "ours", lambda: summaries.histogram("w", tf.constant(values)))["w"]
    theirs = _written(tmp_path / "theirs", lambda: tf.summary.histogram("w", tf.constant(values)))["w"]
    assert ours.shape == theirs.shape == (30, 3)
    np.testing.assert_allclose(ours[:, :2], theirs[:, :2], rtol=1e-12)
    assert (ours[:, 2] == theirs[:, 2]).all() and ours[:, 2].sum() == values.size
