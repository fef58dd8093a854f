"""Shared fixtures: two logical CPU devices, a tiny demo dataset and its conversion."""

import pytest
import tensorflow as tf

from tests.helpers import TRAIN_PER_CLASS, VAL_PER_CLASS, run_conversion, tiny_run_config

# Before anything initializes TensorFlow's runtime: 2 logical CPUs stand in for 2 GPUs (towers, replicas).
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory):
    from pipeline import demo_data

    root = str(tmp_path_factory.mktemp("raw"))
    demo_data.write_demo_dataset(root, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0)
    return root


@pytest.fixture(scope="session")
def demo_data(demo_raw, tmp_path_factory):
    return run_conversion(demo_raw, str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory):
    """A finished run on the tiny demo set (helpers.tiny_run_config): its config and final evaluation."""
    from training import loop

    config = tiny_run_config(demo_data, tmp_path_factory.mktemp("trained_run"))
    return config, loop.train(config)
