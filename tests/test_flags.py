"""train.py's flags, made from recipe.Config: parsed on a FlagValues of their own, as train.py parses them."""

import dataclasses

import pytest
from absl import app, flags

from training import flags as run_flags
from training import recipe


def _parse(*args):
    values = flags.FlagValues()
    run_flags.define(values)
    values(["train.py", *args])
    return values


def test_with_only_the_folders_given_the_flags_give_the_papers_config():
    values = _parse("--data_dir=d", "--model_dir=m")
    assert run_flags.config(values) == recipe.Config(data_dir="d", model_dir="m")
    for field in dataclasses.fields(recipe.Config):
        assert values[field.name].help.endswith(field.metadata["help"]), field.name  # absl prefixes choices.


def test_every_kind_of_setting_arrives_with_its_fields_type():
    config = run_flags.config(
        _parse(
            "--data_dir=d",
            "--model_dir=m",
            "--image_size=128",
            "--eval_crops=1",
            "--nodeterministic",
            "--learning_rate=0.02",
            "--tower_devices=/gpu:0,/gpu:1",
            "--profile_steps=3,5",
            "--strategy=towers",
        )
    )
    expected = dict(image_size=128, eval_crops=1, deterministic=False, learning_rate=0.02, strategy="towers")
    expected |= dict(tower_devices=("/gpu:0", "/gpu:1"), profile_steps=(3, 5))
    assert config == recipe.Config(data_dir="d", model_dir="m", **expected)


def test_a_runs_flags_txt_gives_the_same_config_again(tmp_path):
    values = _parse("--data_dir=d", "--model_dir=m", "--epochs=3", "--mirrored_devices=/cpu:0", "--cpu_devices=2")
    path = tmp_path / "flags.txt"
    path.write_text(run_flags.serialized(values))
    again = _parse(f"--flagfile={path}")
    assert run_flags.config(again) == run_flags.config(values) and again.cpu_devices == 2


@pytest.mark.parametrize(
    "args, message",
    [(["--image_size=100"], "image_size"), (["--strategy=one"], "strategy"), ([], "data_dir")],
)
def test_values_outside_a_settings_choices_and_missing_folders_are_refused(args, message):
    with pytest.raises(flags.Error, match=message):
        _parse(*(["--data_dir=d", "--model_dir=m"] if args else ["--model_dir=m"]), *args)


def test_profile_steps_that_are_not_numbers_are_refused_naming_the_flag():
    with pytest.raises(app.UsageError, match="--profile_steps=a,b"):
        run_flags.config(_parse("--data_dir=d", "--model_dir=m", "--profile_steps=a,b"))


def test_readmes_job_manager_manifests_parse_and_name_only_train_flags():
    """The Vertex AI custom job and the Kubeflow TFJob shown in README, as yaml.safe_load reads them."""
    import pathlib
    import re

    import yaml

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    vertex, tfjob = (yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", readme, re.S))
    pools = vertex["workerPoolSpecs"]
    assert len(pools) == 2 and all(p["containerSpec"]["command"] == ["python", "train.py"] for p in pools)
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert tfjob["kind"] == "TFJob" and set(replicas) == {"Chief", "Worker"}
    assert all(r["restartPolicy"] == "ExitCode" for r in replicas.values())
    containers = [c for r in replicas.values() for c in r["template"]["spec"]["containers"]]
    assert {c["name"] for c in containers} == {"tensorflow"}  # The name the operator looks for.
    values = flags.FlagValues()
    run_flags.define(values)
    for args in [p["containerSpec"]["args"] for p in pools] + [c["args"] for c in containers]:
        names = [a[2:].split("=")[0] for a in args]
        assert names and all(name in values or name == "flagfile" for name in names), names
        assert "strategy" in names and "model_dir" in names
