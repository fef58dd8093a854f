"""Every benchmark runs, in a tiny configuration, so that `make benchmarks` never breaks unnoticed. The figures
themselves are not checked here: they mean something only at full size (docs/benchmarks.md)."""

import re

import pytest

from tests.helpers import run

TINY = [
    (
        "benchmarks/training_step.py",
        ["--batch_size=2", "--rounds=1", "--precisions=float32"],
        r"float32: matmul roofline \d+ GFLOP/s.*\n  plain: .*\n  alexnet: .*\n  alexnet compiled: .*\n"
        r"  alexnet / plain: \d+\.\d\d.*\n  alexnet compiled / plain: \d+\.\d\d",
    ),
    (
        "benchmarks/conversion.py",
        ["--images=8", "--workers=1", "--mode=multi_threading"],
        r"16 images: plain PIL loop \d+ img/s.*\n.*\n.* ms of CPU per image: full ImageNet",
    ),
    (
        "benchmarks/input_pipeline.py",
        ["--images=256", "--batch_size=8", "--rounds=1", "--step_rounds=0"],
        r"reader: \d+ img/s vs plain \d+ img/s: \d+\.\d\d.*\n(.*\n)*  service: \d+ img/s vs reader",
    ),
    ("benchmarks/serving_resize.py", [], r"served vs record \(what training saw\): \d+\.\d\d; \d+\.\d"),
    (
        "benchmarks/serving_memory.py",
        ["--classes=10", "--image_size=64", "--crop_size=64"],
        r"photos, limits: \d+ MB peak, 0 of 8 requests refused\n  hostile, limits: \d+ MB peak, 5 of 5 requests "
        r"refused\n  hostile, no limits: \d+ MB peak, 1 of 4",
    ),
    (
        "benchmarks/service_fleet.py",
        ["--splits=3", "--items=16", "--item_ms=5", "--consumers=1"],
        r"first come, first served, 1 consumer\(s\): missed by pass \{.*\}; duplicates 0\n(    step .*\n)+"
        r"  coordinated reads, 1 consumer\(s\): missed by pass",
    ),
    (
        "benchmarks/memory.py",
        ["--batch_size=8", "--classes=10", "--image_size=64", "--crop_size=64", "--records_per_shard=40"],
        r"training step: [\d,]+ MB at its peak.*\n  10-crop evaluation: [\d,]+ MB.*\n  training reader: [\d,]+ MB "
        r"above.*\n  train.py .*: [\d,]+ MB at its peak",
    ),
]


@pytest.mark.parametrize("script, args, prints", TINY, ids=[script for script, _, _ in TINY])
def test_benchmark_runs_in_a_tiny_configuration(script, args, prints):
    result = run(script, *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(prints, result.stdout), result.stdout
