"""The long-run path as users meet it: a real train.py killed with SIGKILL, and TensorBoard reading a run.
`make test-slow`."""

import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.helpers import free_ports, output, run, start

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"  # Debian's package.

FLAGS = [
    "--flagfile=configs/demo.flags",
    "--epochs=4",
    "--batch_size=16",
    "--image_size=64",
    "--crop_size=64",
    "--warmup_steps=10",
    "--log_every_steps=1",
    "--checkpoint_every_steps=4",
]


def _wait_for(process, pattern, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.findall(pattern, os.pread(process.log.fileno(), 1 << 24, 0).decode())  # Not moving its offset.
        if match:
            return match
        assert process.poll() is None, "train.py ended before the kill"
        time.sleep(0.2)
    raise TimeoutError(pattern)


def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_with_the_same_weights(demo_data, tmp_path):
    reference = run("train.py", *FLAGS, f"--data_dir={demo_data}", f"--model_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = ["train.py", *FLAGS, f"--data_dir={demo_data}", f"--model_dir={tmp_path / 'killed'}"]
    process = start(*args)
    _wait_for(process, r"step 5/12 ")  # Epoch 2 of 4 (63 images: 3 steps of 16 each), after a checkpoint at 4.
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start_step = int(re.search(r"Resuming \S+ at step (\d+): epoch 2, step \d of it", resumed.stdout).group(1))
    assert 4 <= start_step <= 5  # At most one checkpoint interval (4 steps) redone: here at most one step.
    steps = [int(s) for s in re.findall(r"^step (\d+)/12", resumed.stdout, re.M)]
    assert steps == list(range(start_step + 1, 13))
    digest = re.compile(r"weights sha256 ([0-9a-f]{16})")
    assert digest.search(resumed.stdout).group(1) == digest.search(reference.stdout).group(1)
    with open(tmp_path / "killed" / "eval.json") as f, open(tmp_path / "reference" / "eval.json") as g:
        assert json.load(f) == json.load(g)


def test_a_run_killed_again_and_again_at_random_moments_ends_with_the_uninterrupted_weights(demo_data, tmp_path):
    """README's promise, "a run killed at any moment continues exactly where it was": kill -9 at random moments
    (a checkpoint every step, so some kills land inside a save), then SIGTERM (exit 143, saved), each time the same
    command again; the run ends with the uninterrupted run's weights."""
    reference = run("train.py", *FLAGS, f"--data_dir={demo_data}", f"--model_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = ["train.py", *FLAGS, "--checkpoint_every_steps=1", f"--data_dir={demo_data}", f"--model_dir={tmp_path}/run"]
    seed = time.time_ns()
    rng, kills = random.Random(seed), []
    for _ in range(6):
        process = start(*args)
        _wait_for(process, r"step \d+/12 ")  # Training, not starting up.
        time.sleep(rng.uniform(0, 2))
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills.append(re.findall(r"^step (\d+)/12", os.pread(process.log.fileno(), 1 << 24, 0).decode(), re.M)[-1])
    process = start(*args)
    _wait_for(process, r"step \d+/12 ")
    process.send_signal(signal.SIGTERM)
    status, printed = output(process)
    if status != 0:  # Not finished before the notice: saved and stopped, with "preempted".
        assert status == 143 and re.search(r"stopped by SIGTERM: saved step \d+", printed), (status, printed[-3000:])
    resumed = run(*args)
    assert resumed.returncode == 0, (seed, kills, resumed.stderr[-3000:])
    digest = re.compile(r"weights sha256 ([0-9a-f]{16})")
    assert digest.search(resumed.stdout)[1] == digest.search(reference.stdout)[1], (seed, kills)


def test_tensorboard_serves_the_runs_curves_images_and_histograms(demo_data, tmp_path):
    result = run("train.py", *FLAGS, "--epochs=2", f"--data_dir={demo_data}", f"--model_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (port,) = free_ports(1)
    board = start("-m", "tensorboard.main", f"--logdir={tmp_path}", "--host=127.0.0.1", f"--port={port}")
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/scalars/tags", timeout=5) as response:
                    scalars = json.load(response)
                if {"train", "validation", "eval"} <= set(scalars):
                    break
            except OSError:
                pass
            assert time.time() < deadline, output(board, timeout=1)
            time.sleep(1)
        with urllib.request.urlopen(f"{base}/images/tags", timeout=5) as response:
            images = json.load(response)
        with urllib.request.urlopen(f"{base}/histograms/tags", timeout=5) as response:
            histograms = json.load(response)
        url = f"{base}/scalars/scalars?run=validation&tag=epoch%2Ftop1_error"
        with urllib.request.urlopen(url, timeout=5) as response:
            validation = json.load(response)
    finally:
        board.send_signal(signal.SIGTERM)
        board.wait()
    assert {"loss", "top1_error", "learning_rate", "images_per_second", "epoch/top1_error"} <= set(scalars["train"])
    assert {"epoch/loss", "epoch/top1_error", "epoch/top5_error"} <= set(scalars["validation"])
    assert {"top1_error_10crop", "top5_error_10crop"} <= set(scalars["eval"])
    assert {"conv1_filters", "inputs/augmented"} <= set(images["train"])
    assert "weights/alexnet/fc6_a/kernel" in histograms["train"]
    assert [point[1] for point in validation] == [3, 6]  # Both epochs, at their last steps.


def _tensorboard(logdir):
    """TensorBoard serving logdir on loopback, once it answers; (process, base URL)."""
    (port,) = free_ports(1)
    board = start("-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1", f"--port={port}")
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=5):
                return board, base
        except OSError:
            assert time.time() < deadline, output(board, timeout=1)
            time.sleep(1)


def test_tensorboards_hparams_dashboard_lists_runs_side_by_side_with_their_errors(demo_data, tmp_path):
    """Two runs of other learning rates under one --logdir: the HParams plugin's API lists both with their
    settings and final errors, and headless Chromium draws the dashboard (the screenshot is kept in tmp_path)."""
    runs = {"lr-0.005": "0.005", "lr-0.01": "0.01"}
    for name, lr in runs.items():
        args = (*FLAGS, "--epochs=1", f"--learning_rate={lr}", f"--data_dir={demo_data}")
        result = run("train.py", *args, f"--model_dir={tmp_path / 'runs' / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    board, base = _tensorboard(tmp_path / "runs")
    try:
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]  # As the tab asks.
        request = {"experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [], "allowedStatuses": statuses}
        url = f"{base}/data/plugin/hparams/session_groups"
        deadline = time.time() + 60
        while True:
            body = json.dumps(request).encode()
            post = urllib.request.Request(url, body, {"Content-Type": "application/json", "X-XSRF-Protected": "1"})
            with urllib.request.urlopen(post, timeout=10) as response:
                groups = json.load(response).get("sessionGroups", [])
            if len(groups) == 2 or time.time() > deadline:
                break
            time.sleep(2)
        screenshot = tmp_path / "hparams.png"
        if os.path.exists(CHROMIUM):
            shot = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"]
            shot += ["--virtual-time-budget=20000", f"--screenshot={screenshot}", f"{base}/#hparams"]
            subprocess.run(shot, capture_output=True, timeout=120, check=True)
    finally:
        board.send_signal(signal.SIGTERM)
        board.wait()
    assert sorted(g["name"] for g in groups) == sorted(runs)
    for group in groups:
        assert str(group["hparams"]["learning_rate"]) == runs[group["name"]]
        metrics = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in group["metricValues"]}
        assert 0 <= metrics[("validation", "epoch/top1_error")] <= 1 and ("eval", "top1_error_10crop") in metrics
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"the API lists both runs; no {CHROMIUM} for the screenshot (apt-get install chromium)")
    assert screenshot.stat().st_size > 20_000  # A drawn page, not a blank one (a blank 1400x900 PNG is ~5 KB).
