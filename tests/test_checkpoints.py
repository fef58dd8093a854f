import json

import pytest

from training import checkpoints


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

    from pipeline.beam import outputs

    path = str(tmp_path / "summary.json")
    outputs.write_bytes(path, b'{"train": 1}')
    monkeypatch.setattr(FileSystems, "rename", _killed)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_bytes(path, b'{"train": 2, "validation": 3}')
    with open(path) as f:
        assert json.load(f) == {"train": 1}


def _killed(*args, **kwargs):
    raise KeyboardInterrupt("killed before the rename")


def test_a_checkpoint_written_before_the_pass_counts_continues_the_run_where_it_was(tmp_path):
    """A run folder of the previous version: its checkpoint holds the Position without PASSES, and the run continues
    from it with every other part of the Position and the weights as saved (the pass counts start at none)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from training import position, recipe, step

    config = recipe.Config(model_dir=str(tmp_path), image_size=64, crop_size=64)
    stats = {"mean_image": np.zeros((64, 64, 3)), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}
    keras.utils.set_random_seed(1)
    model, optimizer = step.build_model(config, 3, stats)
    saved = position.Position(7, 1, 2, recipe.Plateau(0.5, 1, 0), (10.0, 3.0, 4.0, 16.0))
    state = position.TrainState()
    state.write(saved)
    earlier = tf.train.Checkpoint(model=model, optimizer=optimizer, state=position.TrainStateBeforePasses(state))
    tf.train.CheckpointManager(earlier, str(tmp_path / "checkpoints"), max_to_keep=3).save(checkpoint_number=7)
    weights = [w.numpy() for w in model.weights]
    keras.utils.set_random_seed(2)
    model, optimizer = step.build_model(config, 3, stats)
    restored = checkpoints.RunCheckpoints(config, model=model, optimizer=optimizer).restore(first_epoch_steps=7)
    assert restored == saved and restored.passes == (0.0,) * len(position.PASSES)
    for before, after in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
