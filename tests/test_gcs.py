"""The conversion on gs:// through a real GCS API: gcp-storage-emulator on loopback, reached by the
google-cloud-storage client that Beam's gcsio uses (tests/gcs.py), and Beam's Dataflow launch built up to the
point of submitting it (--dry_run)."""

import json
import os
import time

import pytest

from pipeline import demo_data
from tests import gcs
from tests.helpers import ROOT, run, run_conversion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The emulator, and this process's environment pointed at it."""
    with gcs.emulator(tmp_path_factory.mktemp("gcs")) as (proxy, env), pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield proxy, env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A fifth of the demo set (600 training images in 10 class tars of ~1.5 MB, 100 for validation), extracted and
    as the downloaded tars."""
    root = tmp_path_factory.mktemp("inputs")
    folders, tars = str(root / "folders"), str(root / "tars")
    demo_data.write_demo_dataset(folders, train_per_class=60, val_per_class=10, seed=0)
    demo_data.write_as_tars(folders, tars)
    return {"folders": folders, "tars": tars}


@pytest.mark.parametrize("layout", ["folders", "tars"])
def test_a_conversion_from_gs_to_gs_reads_its_input_about_once_and_equals_the_local_one(
    store, inputs, tmp_path, layout
):
    proxy, _ = store
    sent = gcs.upload_tree(inputs[layout], f"gs://{gcs.BUCKET}/{layout}")
    began = time.monotonic()
    local = run_conversion(inputs[layout], str(tmp_path / "local"))
    local_seconds, began = time.monotonic() - began, time.monotonic()
    proxy.reset()
    out = f"gs://{gcs.BUCKET}/{layout}-out"
    run_conversion(f"gs://{gcs.BUCKET}/{layout}", out)
    served, gcs_seconds = proxy.served, time.monotonic() - began
    summary = json.loads(gcs.read(f"{out}/summary.json"))
    with open(os.path.join(local, "summary.json")) as f:
        assert summary == json.load(f)
    for split in ("train", "validation"):  # Every image accounted for: written or rejected with its reason.
        assert summary[split]["seen"] == summary[split]["written"] + summary[split]["rejected"]
    assert summary["train"]["seen"] == 604 and summary["validation"]["seen"] == 100  # 4 quirks among training files.
    for name in sorted(os.listdir(local)):
        if name.startswith(("train-", "validation-")):
            with open(os.path.join(local, name), "rb") as f:
                assert gcs.read(f"{out}/{name}") == f.read(), name
    print(
        f"{layout}: {served / sent:.2f}x the input served ({served:,} of {sent:,} bytes); converted in "
        f"{gcs_seconds:.1f} s from and to gs://, {local_seconds:.1f} s on the local disk"
    )
    assert served <= 1.3 * sent, (served, sent)


def test_readmes_dataflow_command_builds_the_job_without_submitting_it(store, inputs, tmp_path):
    """README's Dataflow command with Beam's --dry_run=True: the job is built (the project packaged from
    --setup_file for the workers) and not submitted; the launcher says so and reads no output."""
    _, env = store
    gcs.upload_tree(inputs["folders"], f"gs://{gcs.BUCKET}/dry-run-input")
    command = [
        "-m",
        "pipeline.build_tfrecords",
        f"--input_dir=gs://{gcs.BUCKET}/dry-run-input",
        f"--output_dir=gs://{gcs.BUCKET}/dry-run-output",
        "--runner=DataflowRunner",
        "--project=alexnet-reference",
        "--region=us-central1",
        f"--temp_location=gs://{gcs.BUCKET}/tmp",
        "--setup_file=./setup.py",
        "--dry_run=True",
    ]
    result = run(*command, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    built = "Built the DataflowRunner job (--dry_run): not submitted, nothing written; its workers would get "
    assert built in result.stdout
    assert "workflow.tar.gz" in result.stdout.split(built)[1].splitlines()[0]  # The project, from --setup_file.
    assert "No module named build" not in result.stderr
