r"""Converts raw ImageNet (ILSVRC-2012 layout) into 256x256 JPEG TFRecord shards and the paper's statistics.

    python -m pipeline.build_tfrecords --input_dir=RAW --output_dir=OUT [Beam options, e.g. --runner=DataflowRunner]

RAW holds the extracted train/<wnid>/ and val/ folders (Kaggle's copy: its ILSVRC/Data/CLS-LOC), or the downloaded
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, read in place without extracting (pipeline/beam/sources.py).

Writes to OUT: train-SSSSS-of-NNNNN and validation-SSSSS-of-NNNNN shards, stats.npz / stats.json (mean image and
RGB PCA, from the training images), labels.txt (label i is line i's wnid, and its name when known),
rejected.tsv (every file not written,
with its reason) and summary.json (seen = written + rejected per split; written last, so it marks a whole output).
Flags this module does not know are Beam pipeline options; on DirectRunner both cores are used unless told otherwise.
"""

import dataclasses
import importlib
import json
import logging

import apache_beam as beam
from absl import app, flags
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)

from pipeline.beam import conversion, outputs, progress, sources, transforms

D = conversion.Config()  # The flags' defaults.
_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Raw ImageNet folder holding train/ and val/.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards and statistics go.", required=True)
_TRAIN_SHARDS = flags.DEFINE_integer("train_shards", D.train_shards, "Number of training shards.", lower_bound=1)
_VAL_SHARDS = flags.DEFINE_integer(
    "validation_shards", D.validation_shards, "Number of validation shards.", lower_bound=1
)
_VAL_LABELS = flags.DEFINE_string(
    "val_labels_file",
    None,
    "Labels of a flat val/ folder: one wnid per line in image-number order, or Kaggle's LOC_val_solution.csv. "
    "Default: <input_dir>/validation_labels.txt or LOC_val_solution.csv (for Kaggle's <top>/ILSVRC/Data/CLS-LOC "
    "also <top>/LOC_val_solution.csv) if present, else the ILSVRC-2012 file shipped by tensorflow-datasets.",
)
_CLASS_NAMES = flags.DEFINE_string(
    "class_names_file",
    None,
    "Names of the classes, 'wnid name' per line (the ILSVRC devkit's synset_words.txt). Default: "
    "<input_dir>/LOC_synset_mapping.txt or synset_words.txt if present (for Kaggle's copy also at its top); "
    "labels.txt lists them.",
)
_TAR_READS = flags.DEFINE_enum(
    "tar_reads",
    D.tar_reads,
    conversion.TAR_READS,
    "How the downloaded tars are read: in_order (front to back, converting as they come: object stores), "
    "at_offsets (listed, then each image read by its shard's writer: local disks; only references are shuffled); "
    "auto: in_order from an object store, at_offsets from the local file system.",
)
_PROGRESS_SECONDS = flags.DEFINE_float(
    "progress_seconds", D.progress_seconds, "Each worker logs its progress this often.", lower_bound=0
)
_SEED = flags.DEFINE_integer("seed", D.seed, "Seed of the shuffle that assigns images to shards.")
_QUALITY = flags.DEFINE_integer("jpeg_quality", D.jpeg_quality, "JPEG quality of the stored images.", 1, 100)
_MIN_SIDE = flags.DEFINE_integer("min_side", D.min_side, "Reject images with a side shorter than this.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", D.max_pixels, "Reject images with more pixels than this.")


# Runners Beam knows only by their full name, whose options exist once their module is imported.
RUNNERS = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def pipeline_options(beam_args):
    """Beam options from the flags absl did not know; unknown ones are fatal, as for absl."""
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    if runner in RUNNERS:
        importlib.import_module(RUNNERS[runner].rsplit(".", 1)[0])
    options = PipelineOptions(beam_args)
    if runner in RUNNERS:
        options.view_as(StandardOptions).runner = RUNNERS[runner]
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    if unknown:
        raise app.UsageError(f"unknown flags (neither this job's nor Beam's): {sorted(unknown)}")
    given = {a.split("=")[0] for a in beam_args}
    if options.view_as(StandardOptions).runner in (None, "DirectRunner"):
        direct = options.view_as(DirectOptions)
        if "--direct_num_workers" not in given:
            direct.direct_num_workers = 0  # One worker per core.
        if "--direct_running_mode" not in given:
            # Processes: the threaded runner lost elements between a stage of long bundles (tars converted as
            # they are read) and the GroupByKey after it (docs/choices.md, "Conversion"); processes lost none.
            direct.direct_running_mode = "multi_processing"
    if "--default_sdk_harness_log_level" not in given:
        options.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"  # Workers: warnings and errors.
    return options


def staged_files(result):
    """What a built Dataflow job stages for its workers (workflow.tar.gz: this project, from --setup_file)."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    job = getattr(result, "job", None)
    if job is None:
        return []
    names = set()
    for environment in job.proto_pipeline.components.environments.values():
        for artifact in environment.dependencies:
            if artifact.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
                payload = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload)
                names.add(payload.staged_name)
    return sorted(names)


def config_from_flags():
    """The conversion.Config of the flags (the labels and names files are read into it by main)."""
    names = {f.name for f in dataclasses.fields(conversion.Config)} - {"val_labels", "class_names"}
    return conversion.Config(**{name: flags.FLAGS[name].value for name in names})


def main(argv):
    input_dir, output_dir = _INPUT_DIR.value, _OUTPUT_DIR.value
    options = pipeline_options(argv[1:])
    if options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        # Worker processes print their own log lines; the runner would relay each again as one long line.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    if sources.layout(input_dir, "train")[0] is None:
        raise app.UsageError(
            f"--input_dir={input_dir} has neither train/<wnid>/ folders nor {sources.TARS['train']}: "
            "point it at the folder holding ImageNet's extracted train/ and val/, or the downloaded tars"
        )
    try:
        # Read here and sent to the workers as data: they may not see the files this machine sees (the
        # labels file tensorflow-datasets ships is in this machine's site-packages).
        val_labels = sources.load_val_labels(input_dir, _VAL_LABELS.value)
        class_names = sources.resolve_class_names(input_dir, _CLASS_NAMES.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    config = dataclasses.replace(config_from_flags(), val_labels=val_labels, class_names=class_names)
    p = beam.Pipeline(options=options)
    _ = p | "ConvertImageNet" >> transforms.ConvertImageNet(config)
    result = p.run()
    result.wait_until_finish()
    if options.view_as(TestOptions).dry_run:  # Beam's --dry_run: the job was built, not run.
        staged = ", ".join(staged_files(result)) or "nothing"
        print(
            f"Built the {options.view_as(StandardOptions).runner} job (--dry_run): not submitted, nothing written; "
            f"its workers would get {staged}"
        )
        return
    with FileSystems.open(FileSystems.join(output_dir, "summary.json")) as f:
        summary = json.load(f)
    print(f"Wrote {output_dir}: {json.dumps(summary)}")
    try:
        metrics = result.metrics()
    except NotImplementedError:  # The DaskRunner keeps no metrics.
        return
    seconds = progress.conversion_span(metrics)
    if seconds:
        images = sum(summary[split]["seen"] for split in outputs.SPLITS)
        cpu = progress.conversion_cpu_seconds(metrics)
        print(
            f"Converted {images} images in {seconds:.1f} s from the first shard started to the last one written: "
            f"{images / seconds:.1f} images/s, {1000 * cpu / images:.1f} ms of CPU per image"
        )


def _parse_flags(argv):
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # Its INFO lines are noise here.
    app.run(main, flags_parser=_parse_flags)
