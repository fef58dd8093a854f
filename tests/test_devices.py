"""Where a run computes: the devices it names, its all-reduce, and a refusal to train on the CPU by accident."""

import dataclasses

import pytest
import tensorflow as tf

from tests.helpers import TWO_DEVICES, tiny_run_config
from training import checks, devices, loop, recipe

GPUS = ("/device:GPU:0", "/device:GPU:1")


def test_the_all_reduce_is_nccl_in_one_pack_over_gpus_and_tensorflows_choice_over_cpus(monkeypatch):
    made = []
    with monkeypatch.context() as patch:  # What the strategy is given (NCCL is built without GPUs; runs on them).
        patch.setattr(tf.distribute, "NcclAllReduce", lambda **kwargs: made.append(("nccl", kwargs)))
        patch.setattr(tf.distribute, "MirroredStrategy", lambda *args, **kwargs: made.append((args, kwargs)))
        devices.cross_device_ops("auto", GPUS)
        devices.make_strategy(recipe.Config(mirrored_devices=TWO_DEVICES))
    assert made[0] == ("nccl", {"num_packs": 1})
    (names,), options = made[1]
    assert names == list(TWO_DEVICES) and isinstance(options["cross_device_ops"], tf.distribute.ReductionToOneDevice)
    assert isinstance(devices.cross_device_ops("auto", TWO_DEVICES), tf.distribute.ReductionToOneDevice)
    assert isinstance(devices.cross_device_ops("hierarchical_copy", GPUS), tf.distribute.HierarchicalCopyAllReduce)
    kind = tf.distribute.experimental.CommunicationImplementation
    for gpus, implementation in ((True, kind.NCCL), (False, kind.RING)):
        options = devices.communication("auto", gpus)
        assert options.implementation == implementation and options.bytes_per_pack == devices.PACK_BYTES


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(all_reduce="nccl", mirrored_devices=TWO_DEVICES), "--all_reduce=nccl needs GPUs"),
        (dict(all_reduce="ring"), "--all_reduce=ring is not for --strategy=mirrored"),
        (dict(all_reduce="one_device", strategy="multi_worker"), "is not for --strategy=multi_worker"),
    ],
)
def test_an_all_reduce_the_replicas_cannot_run_is_refused(settings, message):
    config = recipe.Config(**settings)
    with pytest.raises(checks.ConfigError, match=message):
        checks.check_config(config)
        checks.check_accelerators(config, TWO_DEVICES)


def test_mirrored_with_no_gpu_in_sight_is_refused_before_anything_is_written_unless_told_to_use_the_cpu(
    demo_data, tmp_path, capsys
):
    config = dataclasses.replace(tiny_run_config(demo_data, tmp_path / "refused"), mirrored_devices=())
    with pytest.raises(checks.ConfigError, match=r"--strategy=mirrored trains on GPUs, and TensorFlow sees none") as e:
        loop.start(config)
    assert "pip install -e '.[gpu]'" in str(e.value) and "--train_on_cpu" in str(e.value)
    assert not tmp_path.joinpath("refused").exists()
    run, _ = loop.start(dataclasses.replace(config, train_on_cpu=True, model_dir=str(tmp_path / "cpu")))
    run.claim.release()
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Training on 2 x CPU (logical devices of one CPU): 2 replica(s) (MirroredStrategy, ")
