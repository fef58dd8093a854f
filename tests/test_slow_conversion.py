"""The conversion on a real multi-process runner, and on workers that have only what setup.py installs:
`make test-slow`."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT, free_ports, run

pytestmark = pytest.mark.slow


def _same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        with open(os.path.join(a, name), "rb") as f, open(os.path.join(b, name), "rb") as g:
            assert f.read() == g.read(), name


def test_the_dask_runner_on_a_local_cluster_writes_the_direct_runners_bytes(demo_raw, tmp_path):
    """A dask.distributed scheduler and two worker processes on loopback, as Beam's DaskRunner runs at scale."""
    (port,) = free_ports(1)
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    cluster = [subprocess.Popen([dask, "scheduler", "--host=127.0.0.1", f"--port={port}", "--no-dashboard"], cwd=ROOT)]
    time.sleep(3)
    for _ in range(2):
        worker = [dask, "worker", f"tcp://127.0.0.1:{port}", "--nthreads=1", "--no-dashboard"]
        cluster.append(subprocess.Popen(worker, cwd=ROOT))
    try:
        args = [
            "-m",
            "pipeline.build_tfrecords",
            f"--input_dir={demo_raw}",
            "--train_shards=4",
            "--validation_shards=2",
        ]
        dask_run = run(
            *args,
            f"--output_dir={tmp_path / 'dask'}",
            "--runner=DaskRunner",
            f"--dask_client_address=tcp://127.0.0.1:{port}",
        )
    finally:
        for process in cluster:
            process.terminate()
            process.wait()
    assert dask_run.returncode == 0, dask_run.stderr[-3000:]
    direct = run(*args, f"--output_dir={tmp_path / 'direct'}")
    assert direct.returncode == 0, direct.stderr[-3000:]
    _same_files(tmp_path / "direct", tmp_path / "dask")


def test_workers_with_only_what_setup_py_installs_run_the_jobs_steps(demo_raw, tmp_path):
    """What --setup_file gives Dataflow's workers: this package and its install_requires over Beam with its GCP
    extra (the workers' container has them): no extras of ours, nothing from the launching machine; gs:// paths
    resolve to Beam's GCS file system. tensorflow-datasets comes with install_requires: the last step writes TFDS's
    metadata."""
    venv, source = tmp_path / "venv", tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:  # The checkout as the launcher ships it (pip builds in the source folder).
        os.makedirs(source / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), source / name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--quiet", "apache-beam[gcp]==2.77.*", str(source)]
    subprocess.run(install, check=True, cwd=tmp_path, timeout=1800)
    code = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("pytest") is None  # None of the test extra.
        import apache_beam as beam
        from apache_beam.io.filesystems import FileSystems
        assert type(FileSystems.get_filesystem("gs://bucket/x")).__name__ == "GCSFileSystem"
        from pipeline.beam import conversion, sources, transforms
        assert transforms.__file__.startswith({str(venv)!r}), transforms.__file__  # The installed copy.
        labels = sources.read_val_labels({str(os.path.join(demo_raw, "validation_labels.txt"))!r})
        with beam.Pipeline() as p:
            _ = p | transforms.ConvertImageNet(conversion.Config(input_dir={demo_raw!r},
                output_dir={str(tmp_path / "out")!r}, train_shards=2, validation_shards=1, val_labels=labels))
        print(open({str(tmp_path / "out" / "summary.json")!r}).read())
        print(sorted(__import__("os").listdir({str(tmp_path / "out")!r})))
    """)
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"written": 20' in result.stdout  # The demo set's 2 validation images of each of 10 classes.
    assert "'dataset_info.json'" in result.stdout and "'features.json'" in result.stdout


def test_tars_converted_by_two_local_workers_lose_nothing(tmp_path):
    """The DirectRunner's default for several workers. Its threaded mode lost 1 to 3 of 2,000 images between
    the tars' conversion and the GroupByKey in 3 runs of 3; the job's accounting stops such a run."""
    from pipeline import demo_data

    raw, tars = tmp_path / "raw", tmp_path / "tars"
    counts = demo_data.write_demo_dataset(str(raw), train_per_class=150, val_per_class=1)
    demo_data.write_as_tars(str(raw), str(tars))
    for attempt, tar_reads in enumerate(["in_order", "in_order", "at_offsets"]):
        out = tmp_path / f"out{attempt}"
        args = [
            "-m",
            "pipeline.build_tfrecords",
            f"--input_dir={tars}",
            f"--output_dir={out}",
            "--direct_num_workers=2",
            f"--tar_reads={tar_reads}",
        ]
        result = run(*args, "--train_shards=8", "--validation_shards=1")
        assert result.returncode == 0, result.stderr[-3000:]
        train = json.loads((out / "summary.json").read_text())["train"]
        assert train["seen"] == counts["train"] + counts["quirks"]
        assert train["written"] >= counts["train"]  # Every drawn image; of the quirks, those the job can read.
