import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator

from model import classifier
from tests.helpers import TWO_DEVICES, scalars, tiny_run_config
from training import checkpoints, checks, devices, evaluation, feed, loop, recipe, stopping, summaries
from training import step as train_step
from training.position import METRICS, PASSES

STATS = {"mean_image": np.full((72, 72, 3), 120.0), "eigenvalues": np.ones(3), "eigenvectors": np.eye(3)}


def _config(data_dir, model_dir, **overrides):
    return tiny_run_config(data_dir, model_dir, **overrides)


class Stopped(Exception):
    """Stands for a kill: the run ends there, with whatever it saved before."""


class Steps:
    """train()'s before_step: counts the steps a run takes, and stops it (like a kill) before step `stop_at`."""

    def __init__(self, stop_at=None):
        self.taken, self.stop_at = [], stop_at

    def __call__(self, step):
        if step == self.stop_at:
            raise Stopped(f"stopped before step {step}")
        self.taken.append(step)


def _steps_logged(folder, tag):
    """Every step a tag was written at, across the folder's event files (duplicates kept)."""
    steps = []
    for name in os.listdir(folder):
        acc = event_accumulator.EventAccumulator(os.path.join(folder, name), size_guidance={"tensors": 0})
        acc.Reload()
        if tag in acc.Tags()["tensors"]:
            steps += [e.step for e in acc.Tensors(tag)]
    return sorted(steps)


@pytest.fixture(scope="module")
def reference(trained_run):
    """An uninterrupted run (conftest.trained_run): its config and final evaluation."""
    return trained_run


def test_a_run_writes_checkpoints_the_best_weights_and_the_final_evaluation(reference):
    config, result = reference
    folder = config.model_dir
    assert {"checkpoints", "best", "eval.json", "config.json", "train", "validation", "eval"} <= set(os.listdir(folder))
    with open(os.path.join(folder, "eval.json")) as f:
        assert json.load(f) == result
    assert result["images"] == 20 and result["crops"] == 10
    assert 0.0 <= result["top5_error"] <= result["top1_error"] <= 1.0
    assert sum(c["images"] for c in result["per_class"].values()) == 20 and len(result["per_class"]) == 10
    state = tf.train.load_checkpoint(checkpoints.resolve(folder, "latest"))
    assert state.get_tensor("state/step/.ATTRIBUTES/VARIABLE_VALUE") == 6  # 2 epochs of 3 steps.
    with open(os.path.join(folder, "config.json")) as f:
        assert recipe.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()}) == config


def test_a_run_stopped_again_and_again_resumes_exactly_where_its_checkpoints_were(reference, monkeypatch, tmp_path):
    """One run stopped (as by a kill) before its first checkpoint (before step 2), in the warm-up (before step 3:
    checkpoint at 2), after epoch 1 (before step 4: checkpoint at 3, the epoch's end), by SIGTERM (a preemption
    notice) before step 4, and in its final evaluation. Each time the same command continues from the last
    checkpoint and takes only the steps after it; the run ends with the uninterrupted run's weights, bit for bit,
    and TensorBoard holds one point per step. SIGTERM saves and stops a step later: the loop reads the request
    from a step that has finished."""
    config = dataclasses.replace(reference[0], model_dir=str(tmp_path))
    legs = []
    for stop_at in (2, 3, 4):
        steps = Steps(stop_at=stop_at)
        with pytest.raises(Stopped):
            loop.train(config, before_step=steps)
        legs.append(steps.taken)
    steps, handler = Steps(), signal.getsignal(signal.SIGTERM)

    def notice_before_step_4(step):
        steps(step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(stopping.Preempted) as stopped:
        loop.train(config, before_step=notice_before_step_4)
    legs.append(steps.taken)
    assert stopped.value.step == 5 and checkpoints.resolve(config.model_dir, "latest").endswith("ckpt-5")
    assert signal.getsignal(signal.SIGTERM) is handler  # Given back: the process is not left deaf to SIGTERM.
    with monkeypatch.context() as patch:
        patch.setattr(loop, "final_evaluation", lambda run, position: (_ for _ in ()).throw(Stopped("in evaluation")))
        steps = Steps()
        with pytest.raises(Stopped):
            loop.train(config, before_step=steps)
        legs.append(steps.taken)
    steps = Steps()
    result = loop.train(config, before_step=steps)
    legs.append(steps.taken)
    assert legs == [[1], [1, 2], [3], [4, 5], [6], []]
    assert result["weights_sha256"] == reference[1]["weights_sha256"]
    assert result == reference[1]
    for tag in ("loss", "learning_rate"):  # The stopped legs' points after their checkpoints were dropped.
        assert _steps_logged(os.path.join(config.model_dir, "train"), tag) == [1, 2, 3, 4, 5, 6]


def test_a_stop_during_validation_or_by_ctrl_c_saves_at_once_and_resumes_exactly(reference, monkeypatch, tmp_path):
    """Ctrl-C during epoch 1's validation: the validation stops at its next batch, the epoch's steps are saved
    (step 3) and the resumed run validates them again, ending with the uninterrupted run's weights; the handlers
    are given back. After a request, a Ctrl-C stops at once."""
    config = dataclasses.replace(reference[0], model_dir=str(tmp_path))
    real, batches = evaluation.evaluate, []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # As in a terminal (make's jobs ignore it).

    def interrupted_once(*args, stop, **kwargs):
        if not batches:
            os.kill(os.getpid(), signal.SIGINT)
        batches.append(stop())
        return real(*args, stop=stop, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "evaluate", interrupted_once)
        with pytest.raises(stopping.Preempted) as stopped:
            loop.train(config)
    assert stopped.value.step == 3 and stopped.value.exit_code == 130 and "stopped by SIGINT" in str(stopped.value)
    assert checkpoints.resolve(config.model_dir, "latest").endswith("ckpt-3") and batches == [1.0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not os.path.exists(os.path.join(config.model_dir, ".claim.json"))  # Given up for the next start.
    result = loop.train(config)
    assert result == reference[1]
    with stopping.Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not preemption.requested and time.monotonic() < deadline:  # Noted by the listening thread.
            time.sleep(0.05)
        assert preemption.alive() == 1.0 and preemption.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="Ctrl-C again"):  # After a request, Ctrl-C stops at once.
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    signal.signal(signal.SIGINT, previous)


def test_a_stop_while_the_next_batch_never_comes_saves_the_steps_before_it_and_resumes_exactly(
    reference, monkeypatch, tmp_path
):
    """The reader stalls before step 5 (as a stalled bucket or a tf.data service without live workers would) and
    SIGTERM comes while the step waits: the run saves the 4 steps it took within a second or so and stops; started
    again, it ends with the uninterrupted run's weights."""
    config = dataclasses.replace(reference[0], model_dir=str(tmp_path))
    stalled, real = threading.Event(), feed.Planned.batches

    def stalling(self, epoch, skip_steps):
        batches = real(self, epoch, skip_steps)
        for step in range(skip_steps, self.steps(epoch)):
            if epoch == 1 and step == 1:  # Step 5: 3 steps an epoch.
                stalled.set()
                threading.Event().wait()  # For ever: the fetching thread is a daemon.
            yield next(batches)

    sent = []

    def notice_when_stalled():
        stalled.wait()
        time.sleep(1)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(feed.Planned, "batches", stalling)
        threading.Thread(target=notice_when_stalled, daemon=True).start()
        with pytest.raises(stopping.Preempted) as stopped:
            loop.train(config)
    assert time.monotonic() - sent[0] < stopping.Preemption.GRACE_SECONDS  # Saved, not given up on.
    assert stopped.value.step == 4 and checkpoints.resolve(config.model_dir, "latest").endswith("ckpt-4")
    assert loop.train(config) == reference[1]


def test_a_stop_no_worker_can_save_at_ends_the_run_unsaved_within_the_grace(monkeypatch):
    """Several workers must save at one step; a worker whose step never ends (its input, or a collective waiting
    for a lost peer) exits with the preemption's status GRACE_SECONDS after the request, its last checkpoint
    standing."""
    exits = []
    monkeypatch.setattr(stopping.Preemption, "GRACE_SECONDS", 0.5)
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    preemption = stopping.Preemption()
    preemption._act(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [143]
    preemption = stopping.Preemption()
    preemption._act(signal.SIGTERM)
    preemption.saving = True  # It saved in time: the watch stands down.
    time.sleep(1)
    assert exits == [143]


@pytest.mark.slow  # 1 min: a §4-style unlucky moment, kept out of the default suite's time.
def test_a_run_killed_between_its_best_weights_and_its_checkpoint_keeps_the_best_weights(
    reference, monkeypatch, tmp_path
):
    """The epoch's end writes best/ and the checkpoint; killed between the two writes at the best epoch, the
    resumed run still ends with best/ holding that epoch's weights (--checkpoint=best exports the best network)."""
    best = tf.train.latest_checkpoint(os.path.join(reference[0].model_dir, "best"))
    best_step = int(best.rsplit("-", 1)[1])
    config = dataclasses.replace(reference[0], model_dir=str(tmp_path))
    save, written = tf.train.CheckpointManager.save, []

    def killed_after_the_first_write_at_the_best_step(manager, checkpoint_number=None, **kwargs):
        # The best epoch ends at step 3 or 6, where no periodic checkpoint falls (every 2 steps, not at an
        # epoch's last step): its first write there is the first of the epoch end's two.
        path = save(manager, checkpoint_number=checkpoint_number, **kwargs)
        written.append(checkpoint_number)
        if checkpoint_number == best_step and written.count(best_step) == 1:
            raise Stopped(f"killed between the two writes at step {best_step}")
        return path

    with monkeypatch.context() as patch:
        patch.setattr(tf.train.CheckpointManager, "save", killed_after_the_first_write_at_the_best_step)
        with pytest.raises(Stopped):
            loop.train(config)
    assert loop.train(config) == reference[1]
    resumed_best = tf.train.latest_checkpoint(os.path.join(config.model_dir, "best"))
    assert resumed_best.endswith(f"ckpt-{best_step}")
    for name, _ in tf.train.list_variables(best):
        if name.startswith("model/"):
            np.testing.assert_array_equal(
                tf.train.load_variable(resumed_best, name), tf.train.load_variable(best, name), err_msg=name
            )


def test_a_corrupt_latest_checkpoint_is_skipped_for_the_one_before_and_the_run_ends_the_same(
    reference, tmp_path, capsys
):
    folder = shutil.copytree(reference[0].model_dir, tmp_path / "run")
    os.remove(folder / "eval.json")
    latest = checkpoints.resolve(str(folder), "latest")
    with open(latest + ".data-00000-of-00001", "r+b") as f:
        f.truncate(1000)  # A write cut short (a full disk, a lost machine).
    config = dataclasses.replace(reference[0], model_dir=str(folder))
    steps = Steps()
    assert loop.train(config, before_step=steps) == reference[1]
    assert f"{latest} cannot be read (IndexError: Read less bytes than requested): trying the one before it" in (
        capsys.readouterr().out
    )
    assert steps.taken == [5, 6]  # From ckpt-4.
    for path in checkpoints.newest_first(str(folder / "checkpoints")):
        with open(path + ".data-00000-of-00001", "r+b") as f:
            f.truncate(1000)
    with pytest.raises(checkpoints.CheckpointError, match="none of the 3 checkpoints in .* can be read"):
        loop.train(config)


def test_a_run_whose_checkpoints_were_lost_is_refused_rather_than_trained_again_from_step_0(reference, tmp_path):
    """A folder copied or synced in part: starting over would train over best/ and the TensorBoard curves."""
    folder = shutil.copytree(reference[0].model_dir, tmp_path / "run")
    config = dataclasses.replace(reference[0], model_dir=str(folder))
    saved = folder / "checkpoints"
    names = [os.path.basename(path) for path in checkpoints.newest_first(str(saved))][::-1]
    for name in names:
        os.remove(saved / f"{name}.index")
    with pytest.raises(checkpoints.CheckpointError) as refused:
        loop.train(config)
    named = f"{saved / 'checkpoint'} names {', '.join(names)}"
    assert f"{saved} holds no whole checkpoint, though the run saved some ({named})" in str(refused.value)
    assert "or move --model_dir away and start the run again" in str(refused.value)
    os.remove(saved / "checkpoint")  # The folder gone: best/ says how far the run got.
    best = folder / "best"
    for old in best.glob("ckpt-*"):  # The run's best weights as of step 4 (its first epoch has 3 steps).
        os.rename(old, best / re.sub(r"ckpt-\d+", "ckpt-4", old.name))
    with pytest.raises(checkpoints.CheckpointError, match="best/ckpt-4 holds the weights of a later step than the"):
        loop.train(config)
    for old in best.glob("ckpt-*"):  # Saved at the first epoch's end, killed before checkpoints/: step 0.
        os.rename(old, best / old.name.replace("ckpt-4", "ckpt-3"))
    assert list(saved.glob("ckpt-*.data-*"))  # Data without an index, as a save cut short leaves: no sign either.
    assert checkpoints.written_before(str(folder), first_epoch_steps=3) == ""


def test_a_finished_run_started_again_says_so_and_keeps_its_results(reference, capsys):
    config, result = reference
    eval_json = os.path.join(config.model_dir, "eval.json")
    written = os.path.getmtime(eval_json)
    steps = Steps()
    assert loop.train(config, before_step=steps) == result
    assert steps.taken == [] and os.path.getmtime(eval_json) == written
    assert "has finished training (2 epochs, 6 steps): nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"top1_error": 0.5}'])
def test_a_finished_runs_unreadable_eval_json_is_evaluated_again(reference, tmp_path, capsys, content):
    folder = shutil.copytree(reference[0].model_dir, tmp_path / "run")
    (folder / "eval.json").write_text(content)
    config = dataclasses.replace(reference[0], model_dir=str(folder))
    steps = Steps()
    assert loop.train(config, before_step=steps) == reference[1] and steps.taken == []
    assert f"{folder / 'eval.json'} cannot be read (" in capsys.readouterr().out
    assert json.loads((folder / "eval.json").read_text()) == reference[1]


def test_a_model_dir_holding_a_run_with_other_settings_is_refused(reference):
    config = dataclasses.replace(reference[0], learning_rate=0.01, seed=3)
    with pytest.raises(checks.ConfigError, match=r"--learning_rate=0.005 there, 0.01 now.*--seed=0 there"):
        checks.check_resume(config, config.model_dir)
    longer = dataclasses.replace(reference[0], epochs=3, log_every_steps=2)  # Allowed: a run may go on longer.
    checks.check_resume(longer, longer.model_dir)


def test_tensorboard_holds_every_step_and_every_epoch(reference):
    config, result = reference
    train, validation = (os.path.join(config.model_dir, split) for split in ("train", "validation"))
    for tag in ("loss", "top1_error", "top5_error", "learning_rate", "images_per_second", "step_time_ms"):
        assert _steps_logged(train, tag) == [1, 2, 3, 4, 5, 6], tag  # log_every_steps=1.
    for tag in ("epoch/loss", "epoch/top1_error", "epoch/top5_error"):
        assert _steps_logged(train, tag) == _steps_logged(validation, tag) == [3, 6], tag  # Both epochs.
    learning_rates = scalars(train, "learning_rate")
    np.testing.assert_allclose([learning_rates[s] for s in range(1, 7)], [0.001, 0.002, 0.003, 0.004, 0.005, 0.005])
    acc = scalars(train, None)
    assert sorted(e.step for e in acc.Tensors("conv1_filters")) == [3, 6]
    assert sorted(e.step for e in acc.Tensors("inputs/augmented")) == [3, 6]  # At the epochs' steps (not at 8).
    assert {f"weights/alexnet/{layer}/kernel" for layer in ("conv1_a", "fc8")} <= set(acc.Tags()["tensors"])
    norms = [t for t in acc.Tags()["tensors"] if t.startswith("gradient_norm/")]
    assert len(norms) == 30 and all(scalars(train, t)[6] > 0 for t in norms[:3])
    final = scalars(os.path.join(config.model_dir, "eval"), "top1_error_10crop")
    assert final == {6: pytest.approx(result["top1_error"])}


def test_figure_3_image_is_conv1s_kernels(reference):
    acc = scalars(os.path.join(reference[0].model_dir, "train"), None)
    png = acc.Tensors("conv1_filters")[-1].tensor_proto.string_val[2]  # [width, height, PNG].
    image = tf.io.decode_png(png).numpy()
    assert image.shape == (6 * 12, 16 * 12, 3)  # 96 kernels of 11x11 in rows of 16, 1 px apart.


def test_logged_validation_error_is_that_of_the_validation_images(reference, demo_data):
    config, _ = reference
    logged = scalars(os.path.join(config.model_dir, "validation"), "epoch/top1_error")[6]
    data = checks.load_data(config)
    model = classifier.build_classifier(10, data.stats, image_size=64, crop_size=64, lighting_std=0.1)
    checkpoints.load(model, checkpoints.resolve(config.model_dir, "latest"))
    strategy = tf.distribute.get_strategy()
    files, sizes = data.files["validation"], data.sizes["validation"]
    expected = evaluation.evaluate(
        model, strategy, files, sizes, batch_size=7, image_size=64, crops=1, labels=data.labels
    )
    assert expected["images"] == 20  # Batches of 7: the last one padded, every image counted once.
    assert logged == pytest.approx(expected["top1_error"], abs=1e-6)


class _Model:
    """A 'network' whose logits favour class 1 when the patch's top-left pixel is bright, else class 0."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def net(self, x, training=False):
        bright = tf.cast(x[:, 0, 0, 0] > 100, tf.float32)
        return tf.stack([10 * (1 - bright), 10 * bright], axis=1)

    def __call__(self, images, training=False):
        return self.net(self.preprocess(images, training=training))


def test_ten_crop_evaluation_averages_softmax_over_the_ten_patches():
    from model.augment import Preprocess

    preprocess = Preprocess(16, 12, 0.0)
    preprocess.set_statistics(np.zeros((16, 16, 3)), np.ones(3), np.eye(3))
    model = _Model(preprocess)
    images = np.zeros((1, 16, 16, 3), np.uint8)
    images[0, 0, 0] = 255  # Only the top-left corner patch sees it: 1 of 10 patches votes 1.
    probs = classifier.probabilities(model, tf.constant(images), crops=10).numpy()
    np.testing.assert_allclose(probs[0, 1], 0.1 * 1 + 0.9 * 0, atol=1e-3)
    images[0, 2, 2] = 255  # The centre patch's top-left: the single centre crop now votes 1.
    assert classifier.probabilities(model, tf.constant(images), crops=1).numpy()[0].argmax() == 1


def _step_on_replicas(strategy, model, step, images):
    """The logits each replica computes in training mode at `step`, given the same images."""

    @tf.function
    def run():
        return strategy.run(lambda: train_step.forward(model, images, step, seed=0))

    return [t.numpy() for t in strategy.experimental_local_results(run())]


def test_each_replica_draws_its_own_dropout_masks_and_augmentation():
    """Keras' Dropout drew the same masks on every replica under MirroredStrategy (one seed generator state)."""
    strategy = tf.distribute.MirroredStrategy(list(TWO_DEVICES))
    with strategy.scope():
        model = classifier.build_classifier(4, STATS, image_size=72, crop_size=64, lighting_std=0.0, dropout=0.5)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 72, 72, 3), np.uint8))
    first, second = _step_on_replicas(strategy, model, 7, images)
    assert not np.allclose(first, second)
    again = _step_on_replicas(strategy, model, 7, images)  # A function of (seed, step, replica): repeatable.
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    net = model.net  # Dropout alone (no crops: the same input to fc6 on both replicas) differs too.
    x = tf.random.normal((2, 64, 64, 3), stddev=50.0)
    masks = strategy.run(
        tf.function(lambda: net(x, training=True, seed=train_step.replica_seed(0, tf.constant(7, tf.int64))))
    )
    a, b = (t.numpy() for t in strategy.experimental_local_results(masks))
    assert not np.allclose(a, b)


def _step_config(**overrides):
    """A step's settings for 4 classes of 72x72 images (STATS) in batches of 8."""
    return recipe.Config(batch_size=8, image_size=72, crop_size=64, learning_rate=0.01, weight_std=0.02, **overrides)


def _vector(metrics):
    """A step's named metrics as a vector, in METRICS order."""
    return np.array([float(metrics[name]) for name in METRICS])


def _tiny_step(strategy, precision="float32", tower_devices=None):
    config = _step_config(precision=precision, tower_devices=tuple(tower_devices or ()))
    with strategy.scope():
        model, optimizer = train_step.build_model(config, 4, STATS)
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, (8, 72, 72, 3), dtype=np.uint8), rng.integers(0, 4, 8).astype(np.int32))
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors(data).unbatch().batch(ctx.get_per_replica_batch_size(8)).repeat()
    )
    return model, optimizer, train_step.make_train_step(model, optimizer, strategy, config), iter(dataset)


def test_a_compiled_step_trains_as_the_op_by_op_step_with_each_replicas_own_draws():
    """--jit_compile: each replica's forward and backward pass in XLA gives the same update (within float noise) as
    op by op, which also means each replica kept its own dropout and augmentation draws."""
    strategy = tf.distribute.MirroredStrategy(list(TWO_DEVICES), cross_device_ops=tf.distribute.ReductionToOneDevice())
    weights, metrics = {}, {}
    for jit in (False, True):
        config = _step_config(jit_compile=jit)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model, optimizer = train_step.build_model(config, 4, STATS)
        rng = np.random.default_rng(0)
        data = (rng.integers(0, 256, (8, 72, 72, 3), dtype=np.uint8), rng.integers(0, 4, 8).astype(np.int32))
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx, d=data: tf.data.Dataset.from_tensors(d).unbatch().batch(4).repeat()
        )
        step, iterator = train_step.make_train_step(model, optimizer, strategy, config), iter(dataset)
        metrics[jit] = [_vector(step(next(iterator), tf.constant(i, tf.int64), tf.constant(0.0))) for i in range(3)]
        weights[jit] = [w.numpy() for w in model.trainable_weights]
    np.testing.assert_allclose(metrics[True], metrics[False], rtol=1e-4)
    for compiled, op_by_op in zip(weights[True], weights[False], strict=True):
        np.testing.assert_allclose(compiled, op_by_op, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_each_precision_trains_with_float32_weights_and_loss_scaling_for_float16(precision):
    model, optimizer, step, iterator = _tiny_step(tf.distribute.get_strategy(), precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    before = [w.numpy().copy() for w in model.trainable_weights]
    for i in range(2):
        metrics = step(next(iterator), tf.constant(i, tf.int64), tf.constant(0.0))
    assert np.isfinite(_vector(metrics)).all() and metrics["images"] == 8
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights, strict=True)]
    assert all(changed), [w.path for w, c in zip(model.trainable_weights, changed, strict=True) if not c]


def test_a_steps_images_are_counted_by_their_pass_relative_to_its_epoch():
    """Passes before the epoch's previous, its previous, its own, its next, and any later, eagerly and compiled;
    the step over two replicas sums them, and a batch without passes is all of the epoch's own."""
    epoch = 3
    passes = tf.constant([0, 2, 3, 3, 4, 5, 10, 3], tf.int64)
    expected = [1, 1, 3, 1, 2]
    for count in (train_step.pass_counts, tf.function(train_step.pass_counts)):
        np.testing.assert_array_equal(count(passes, tf.constant(epoch, tf.int64)).numpy(), expected)
    strategy = tf.distribute.MirroredStrategy(list(TWO_DEVICES), cross_device_ops=tf.distribute.ReductionToOneDevice())
    config = _step_config()
    with strategy.scope():
        model, optimizer = train_step.build_model(config, 4, STATS)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 72, 72, 3), dtype=np.uint8), rng.integers(0, 4, 8).astype(np.int32)
    step = train_step.make_train_step(model, optimizer, strategy, config)
    for batch, counts in (((images, labels, passes.numpy()), expected), ((images, labels), [0, 0, 8, 0, 0])):
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx, b=batch: tf.data.Dataset.from_tensors(b).unbatch().batch(4).repeat()
        )
        metrics = step(next(iter(dataset)), tf.constant(0, tf.int64), tf.constant(0.0), epoch=epoch)
        assert [metrics[name] for name in PASSES] == counts and metrics["images"] == 8


def test_towers_on_two_devices_train_every_weight_where_it_lives():
    model, optimizer, step, iterator = _tiny_step(
        devices.make_strategy(recipe.Config(strategy="towers")), tower_devices=TWO_DEVICES
    )
    before = [w.numpy().copy() for w in model.trainable_weights]
    for i in range(2):
        step(next(iterator), tf.constant(i, tf.int64), tf.constant(0.0))
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights, strict=True)]
    assert all(changed)
    for w, momentum in zip(model.trainable_weights, optimizer.momentums, strict=True):  # Momentum beside weights.
        expected = "CPU:1" if w.path.split("/")[1].endswith("_b") else "CPU:0"
        assert w.value.device.endswith(expected) and momentum.value.device.endswith(expected), w.path


@pytest.mark.slow  # ~40 s.
def test_profiled_steps_are_marked_and_a_run_resumed_inside_the_window_traces_the_rest(demo_data, tmp_path):
    """Keras' TensorBoard callback marks steps without _r=1, which leaves the profiler's step pages empty. A run
    killed inside the --profile_steps window and resumed there traces the window's steps it still takes."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    config = _config(demo_data, tmp_path, epochs=1, batch_size=8, profile_steps=(2, 4), eval_crops=1)  # 7 steps.
    with pytest.raises(Stopped):
        loop.train(config, before_step=Steps(stop_at=4))  # Checkpoint at 2; steps 2 and 3 traced.
    tf.profiler.experimental.stop()  # A killed process's profiler ends with it.
    loop.train(config)
    traces = sorted(tf.io.gfile.glob(os.path.join(tmp_path, "train", "plugins", "profile", "*", "*.xplane.pb")))
    assert len(traces) == 2
    with open(traces[-1], "rb") as f:
        space = xplane_pb2.XSpace.FromString(f.read())
    steps, iterator_events = [], 0
    for plane in space.planes:
        events = {k: v.name for k, v in plane.event_metadata.items()}
        stats = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = events[event.metadata_id]
                iterator_events += name.startswith("Iterator::")
                if name == "train":
                    marks = {stats[s.metadata_id]: s.int64_value or s.uint64_value for s in event.stats}
                    steps.append((marks["step_num"], marks["_r"]))
    assert sorted(steps) == [(3, 1), (4, 1)]  # The step-time page's steps: the resumed run's part of the window.
    assert iterator_events > 0  # The input-pipeline page's tf.data events.


def test_the_runs_settings_and_final_errors_are_there_for_tensorboards_hparams(reference):
    from tensorboard.plugins.hparams import metadata

    config, result = reference
    acc = scalars(config.model_dir, None)  # model_dir itself, beside train/, validation/, eval/.
    start = metadata.parse_session_start_info_plugin_data(
        acc.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    )
    values = {k: json_format.MessageToDict(v) for k, v in start.hparams.items()}
    assert values["learning_rate"] == config.learning_rate and values["batch_size"] == config.batch_size
    assert values["mirrored_devices"] == str(config.mirrored_devices) and set(values) == set(config.to_json())
    experiment = metadata.parse_experiment_plugin_data(acc.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content)
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert {("validation", "epoch/top1_error"), ("eval", "top1_error_10crop")} <= metrics
    for split, tag in metrics & {("validation", "epoch/top1_error"), ("eval", "top1_error_10crop")}:
        assert scalars(os.path.join(config.model_dir, split), tag)  # Each metric names a scalar the run wrote.
    assert scalars(os.path.join(config.model_dir, "eval"), "top1_error_10crop")[6] == pytest.approx(
        result["top1_error"]
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 250 MB tmpfs (root only): room for the tiny run's first checkpoint (162 MB), not for a second."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=250m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # TensorFlow keeps its event files open.


@pytest.mark.slow  # ~50 s, and root for the mount.
def test_a_full_disk_stops_the_run_saying_what_it_needs_and_the_same_command_continues_once_there_is_room(
    reference, small_disk
):
    config = dataclasses.replace(reference[0], model_dir=str(small_disk / "run"))
    with pytest.raises(checkpoints.StorageError) as error:
        loop.train(config)
    message = str(error.value)
    assert message.startswith(f"no space left on the device of --model_dir={small_disk / 'run'} (")
    assert "A checkpoint needs about 154 MB" in message and message.endswith(f"{small_disk}/run/checkpoints/ckpt-2")
    subprocess.run(["mount", "-o", "remount,size=1g", str(small_disk)], check=True)  # Room again.
    steps = Steps()
    assert loop.train(config, before_step=steps) == reference[1]
    assert steps.taken == [3, 4, 5, 6] and not glob.glob(f"{small_disk}/run/checkpoints/*_temp")


def _fill(disk):
    """Writes zeros to disk/filler until the disk is full; returns the filler's path."""
    path = os.path.join(disk, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


@pytest.mark.slow  # ~1 min, and root for the mount.
@pytest.mark.parametrize("writing", ["summaries", "eval.json"])
def test_a_disk_that_fills_during_a_summary_or_eval_json_stops_the_run_and_the_same_command_continues(
    reference, small_disk, monkeypatch, writing
):
    """The disk fills just before epoch 1's summaries (TensorBoard's events), or just before eval.json: the run
    stops naming the folder and the checkpoint it continues from, and once there is room the same command ends
    with the uninterrupted run's results."""
    subprocess.run(["mount", "-o", "remount,size=1g", str(small_disk)], check=True)  # Room for the checkpoints.
    config = dataclasses.replace(reference[0], model_dir=str(small_disk / "run"))
    filled = []
    with monkeypatch.context() as patch:
        if writing == "summaries":
            real = summaries.Writers.epoch
            patch.setattr(summaries.Writers, "epoch", lambda *a, **k: (filled.append(_fill(small_disk)), real(*a, **k)))
        else:
            real = checkpoints.write_file

            def full_for_eval_json(path, text):
                if path.endswith("eval.json"):
                    filled.append(_fill(small_disk))
                return real(path, text)

            patch.setattr(checkpoints, "write_file", full_for_eval_json)
        with pytest.raises(checkpoints.StorageError) as error:
            loop.train(config)
    last = "ckpt-2" if writing == "summaries" else "ckpt-6"
    message = str(error.value)
    assert message.startswith(f"no space left on the device of --model_dir={small_disk / 'run'} (")
    assert message.endswith(f"{small_disk}/run/checkpoints/{last}"), message
    os.remove(filled[0])
    assert loop.train(config) == reference[1]


def test_a_preempted_run_exits_with_a_status_the_job_managers_restart_and_a_refusal_with_one_they_do_not():
    """Kubeflow's TFJob (restartPolicy: ExitCode) retries 128-255 and treats 1-127 as permanent; Vertex AI restarts
    any non-zero status. A refusal (sys.exit with its message) is 1."""
    assert stopping.PREEMPTED_EXIT_CODE == stopping.exit_code(signal.SIGTERM) == 143
    assert 128 <= stopping.Preempted(5).exit_code <= 255 and stopping.Preempted(5, signal.SIGINT).exit_code == 130
