"""Shared fixtures: two logical CPU devices, a tiny demo dataset and its conversion, the shared real photos."""

import os

import pytest
import tensorflow as tf

# Before anything initializes TensorFlow's runtime: 2 logical CPUs stand in for 2 GPUs (towers, replicas).
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

PHOTOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "photos")
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 2


def photos_dir():
    """../shared/data/photos, or a skip when this checkout has no shared folder beside it."""
    if not os.path.isdir(PHOTOS):
        pytest.skip("../shared/data/photos is absent")
    return PHOTOS


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory):
    from pipeline import demo_data

    root = str(tmp_path_factory.mktemp("raw"))
    demo_data.write_demo_dataset(root, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, seed=0)
    return root


def run_conversion(input_dir, output_dir, **overrides):
    """The Beam job in-process on the DirectRunner (one worker: fast to start in tests)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import sources, transforms

    kwargs = dict(
        input_dir=input_dir,
        output_dir=output_dir,
        num_shards={"train": 4, "validation": 2},
        seed=0,
        val_labels_file=sources.resolve_val_labels(input_dir),
        convert_kwargs={},
    )
    kwargs.update(overrides)
    with beam.Pipeline(options=PipelineOptions(direct_num_workers=1)) as p:
        _ = p | transforms.ConvertImageNet(**kwargs)
    return output_dir


@pytest.fixture(scope="session")
def demo_data(demo_raw, tmp_path_factory):
    return run_conversion(demo_raw, str(tmp_path_factory.mktemp("data")))
