"""A run's command line: one flag per recipe.Config field, made from the field (its default, help and choices live
there), and the Config the parsed flags give. train.py and tools.check call these; only they parse flags.

Besides the Config, two flags act on the process before TensorFlow starts: --cpu_devices and --op_determinism."""

import dataclasses

from absl import app, flags

from training import recipe


def define(flag_values=flags.FLAGS):
    """Defines the run's flags (once per process: absl refuses a flag defined twice)."""
    for field in dataclasses.fields(recipe.Config):
        _define(field, flag_values)
    flags.DEFINE_integer(
        "cpu_devices", 1, "Split the CPU into this many logical devices.", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_bool(
        "op_determinism",
        False,
        "Deterministic kernels (on GPUs some are not): bit-exact resumes, at some speed.",
        flag_values=flag_values,
    )


def _define(field, flag_values):
    meta, default = field.metadata, field.default
    common = dict(help=meta["help"], flag_values=flag_values)
    if meta.get("required"):
        flags.DEFINE_string(field.name, None, required=True, **common)
    elif "choices" in meta:
        choices = [str(c) for c in meta["choices"]]
        flags.DEFINE_enum(field.name, str(default), choices, **common)
    elif field.type is bool:
        flags.DEFINE_bool(field.name, default, **common)
    elif field.type is int:
        flags.DEFINE_integer(field.name, default, **common)
    elif field.type is float:
        flags.DEFINE_float(field.name, default, **common)
    elif field.type is str:
        flags.DEFINE_string(field.name, default, **common)
    else:  # A tuple: a comma-separated list.
        flags.DEFINE_list(field.name, list(map(str, default)), **common)


def config(flag_values=flags.FLAGS):
    """The Config of the parsed flags, each value of its field's type."""
    values = {}
    for field in dataclasses.fields(recipe.Config):
        value = flag_values[field.name].value
        if field.type is int and isinstance(value, str):  # An enum of numbers.
            value = int(value)
        elif field.type == tuple[int, ...]:
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise app.UsageError(f"--{field.name}={','.join(value)}: give whole numbers") from None
        elif field.type == tuple[str, ...]:
            value = tuple(value)
        values[field.name] = value
    return recipe.Config(**values)


def serialized(flag_values=flags.FLAGS):
    """The run's flags as a flagfile: every one, with its effective value (model_dir/flags.txt)."""
    names = [f.name for f in dataclasses.fields(recipe.Config)] + ["cpu_devices", "op_determinism"]
    return "".join(f"{flag_values[name].serialize()}\n" for name in names)
