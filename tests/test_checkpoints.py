import json
import os

import h5py
import numpy as np
import pytest

from model import classifier
from training import checkpoints

LAYOUT = os.path.join(os.path.dirname(__file__), "data", "weights_h5_layout_v1.json")
STATS = {"mean_image": np.zeros((72, 72, 3)), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}


def _classifier():
    return classifier.build_classifier(10, STATS, image_size=72, crop_size=64, lighting_std=0.1)


def _write_h5(path, layout, rng):
    """A .weights.h5 laid out as the earlier model's Classifier.save_weights wrote it (the layout recorded from
    that code, for 10 classes at 72 -> 64 pixels), holding random arrays."""
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in layout.items()}
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
    return arrays


def test_weights_written_before_the_refactor_load_into_the_same_variables(tmp_path):
    with open(LAYOUT) as f:
        layout = json.load(f)
    arrays = _write_h5(tmp_path / "latest.weights.h5", layout, np.random.default_rng(0))
    model = _classifier()
    checkpoints.load(model, str(tmp_path / "latest.weights.h5"))
    by_path = {v.path: v.numpy() for v in model.weights}
    assert len(by_path) == len(layout) == 33
    for name, array in arrays.items():
        np.testing.assert_array_equal(by_path[checkpoints.legacy_variable_path(name)], array, err_msg=name)


def test_legacy_names_map_the_towers_in_the_papers_order():
    assert checkpoints.legacy_variable_path("layers/alex_net/convs/container/conv2d/vars/0") == "alexnet/conv1_a/kernel"
    assert checkpoints.legacy_variable_path("layers/alex_net/convs/container_2/conv2d_1/vars/1") == (
        "alexnet/conv3_b/bias"
    )
    assert checkpoints.legacy_variable_path("layers/alex_net/fcs/container_1/dense/vars/0") == "alexnet/fc7_a/kernel"


def test_a_weights_file_of_another_model_is_a_clear_error(tmp_path):
    with h5py.File(tmp_path / "other.weights.h5", "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a weights file of this model"):
        checkpoints.load(_classifier(), str(tmp_path / "other.weights.h5"))


def test_a_run_file_killed_mid_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """config.json, labels.txt, flags.txt and eval.json are written then renamed: a kill before the rename (here
    the rename failing) leaves the file the next start reads as it was, never half of the new one."""
    path = str(tmp_path / "config.json")
    checkpoints.write_file(path, '{"epochs": 90}')
    monkeypatch.setattr(checkpoints.tf.io.gfile, "rename", _killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.write_file(path, '{"epochs": 91, "batch_size": 128}')
    with open(path) as f:
        assert json.load(f) == {"epochs": 90}


def test_the_converters_small_files_killed_mid_write_leave_the_previous_ones_whole(tmp_path, monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    from pipeline import outputs

    path = str(tmp_path / "summary.json")
    outputs.write_bytes(path, b'{"train": 1}')
    monkeypatch.setattr(FileSystems, "rename", _killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_bytes(path, b'{"train": 2, "validation": 3}')
    with open(path) as f:
        assert json.load(f) == {"train": 1}


def _killed(*args, **kwargs):
    raise KeyboardInterrupt("killed before the rename")
