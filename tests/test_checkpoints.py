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
