"""config.toml: every key parsed into its value, every bad key or value refused with a
message naming it and what is allowed, and the helpers that apply the configuration.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from salience_server.explain.options import ExplainOptions, Limits
from salience_server.model_config import (
    BatchingOverrides,
    ExplainDefaults,
    InputConfig,
    ModelConfig,
    ModelConfigError,
    ModelLimits,
    PreprocessConfig,
    VersionPolicy,
    load_model_config,
)
from salience_server.settings import BatchingConfig

FULL = """
labels_file = "labels.txt"
labels_output = "probs"

[version_policy]
policy = "latest"
count = 2

[batching]
enabled = false
max_device_batch_size = 16
max_queue_delay_ms = 2.5
batch_buckets = [1, 4, 16]
max_queue_size = 128

[explain]
method = "smoothgrad"
grad_modifiers = ["absolute", "negate"]
normalize = false
output_dtype = "float16"
samples = 8
noise = 0.25
steps = 32

[limits]
max_batch_size = 16
max_objectives = 4
max_samples = 64
max_steps = 256

[preprocess]
input = "image"
scale = 0.5
offset = [-1.0, 0.0, 1.0]
channel_order = "bgr"
resize = "bilinear"

[inputs.image]
wire_dtypes = ["uint8"]
wire_range = "unit"
"""


def write(tmp_path: Path, text: str, **files: str) -> Path:
    model_dir = tmp_path / "m"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.toml").write_text(textwrap.dedent(text))
    for name, content in files.items():
        (model_dir / name).write_text(content)
    return model_dir


def test_no_file_means_the_defaults(tmp_path: Path) -> None:
    config = load_model_config(tmp_path)
    assert config == ModelConfig()
    assert config.version_policy == VersionPolicy("latest", 1, ())
    assert not config.preprocess.active


def test_every_key_of_a_full_file(tmp_path: Path) -> None:
    config = load_model_config(write(tmp_path, FULL, **{"labels.txt": "cat\ndog\n  bird \n\n"}))
    assert config.labels == ("cat", "dog", "bird")
    assert config.labels_output == "probs"
    assert config.version_policy == VersionPolicy("latest", 2, ())
    assert config.batching == BatchingOverrides(False, 16, 2.5, (1, 4, 16), 128)
    assert config.explain == ExplainDefaults(
        method="smoothgrad",
        grad_modifiers=("absolute", "negate"),
        normalize=False,
        output_dtype="float16",
        samples=8,
        noise=0.25,
        steps=32,
    )
    assert config.limits == ModelLimits(16, 4, 64, 256)
    assert config.preprocess == PreprocessConfig(
        input="image",
        scale=(0.5,),
        offset=(-1.0, 0.0, 1.0),
        channel_order="bgr",
        resize="bilinear",
    )
    assert config.preprocess.active
    assert config.inputs == (InputConfig("image", ("uint8",), "unit"),)
    assert config.input_config("image").wire_dtypes == ("uint8",)
    # An input without a table accepts its own dtype only.
    assert config.input_config("mask") == InputConfig("mask", (), "raw")


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ('version_policy = "all"', VersionPolicy("all", 1, ())),
        ('version_policy = "latest"', VersionPolicy("latest", 1, ())),
        ("[version_policy]\ncount = 3", VersionPolicy("latest", 3, ())),
        (
            '[version_policy]\npolicy = "specific"\nversions = [7, 2]',
            VersionPolicy("specific", 1, (2, 7)),
        ),
    ],
)
def test_version_policy_forms(tmp_path: Path, text: str, policy: VersionPolicy) -> None:
    assert load_model_config(write(tmp_path, text)).version_policy == policy


@pytest.mark.parametrize(
    ("policy", "chosen"),
    [
        (VersionPolicy(), (9,)),
        (VersionPolicy("latest", 2), (4, 9)),
        (VersionPolicy("latest", 10), (1, 2, 4, 9)),
        (VersionPolicy("all"), (1, 2, 4, 9)),
        (VersionPolicy("specific", versions=(2, 3, 9)), (2, 9)),
    ],
)
def test_version_policy_picks_exactly_these_versions(
    policy: VersionPolicy, chosen: tuple[int, ...]
) -> None:
    assert policy.select([9, 1, 4, 2]) == chosen
    assert policy.select([]) == ()


BAD = [
    ("verison_policy = 'all'", "config.toml: verison_policy is not a key of the top level: use "
     "'version_policy', 'labels', 'labels_file', 'labels_output', 'batching', 'explain', "
     "'limits', 'preprocess'"),
    ("version_policy = 'newest'", "config.toml: version_policy='newest' is not allowed: use one "
     "of 'latest', 'all', 'specific'"),
    ("version_policy = 'specific'", "config.toml: version_policy='specific' needs its versions"),
    ("[version_policy]\npolicy = 'all'\ncount = 2", "config.toml: version_policy.count=2 does "
     "not apply to policy 'all': only to 'latest'"),
    ("[version_policy]\ncount = 0", "config.toml: version_policy.count=0 is not allowed: use an "
     "integer of at least 1"),
    ("[version_policy]\npolicy = 'specific'", "config.toml: version_policy.versions is missing"),
    ("[version_policy]\npolicy = 'specific'\nversions = [1, 1]", "config.toml: "
     "version_policy.versions=[1, 1] lists a value twice"),
    ("[version_policy]\npolicy = 'specific'\nversions = [0]", "config.toml: "
     "version_policy.versions=[0] is not allowed: use a non-empty list of integers of at least 1"),
    ("[batching]\nmax_queue_size = 0", "config.toml: batching.max_queue_size=0 is not allowed: "
     "use an integer of at least 1"),
    ("[batching]\nmax_queue_size = true", "config.toml: batching.max_queue_size=True is not "
     "allowed"),
    ("[batching]\nenabled = 'yes'", "config.toml: batching.enabled='yes' is not a boolean: use "
     "true or false"),
    ("[batching]\nmax_queue_delay_ms = 70000", "config.toml: batching.max_queue_delay_ms=70000 "
     "is not allowed: use 0..60000"),
    ("[batching]\nmax_device_batch_size = 8\nbatch_buckets = [1, 16]", "config.toml: "
     "batching.batch_buckets=[1, 16] has 16, over batching.max_device_batch_size=8: use 1..8"),
    ("[batching]\nmax_batch = 3", "config.toml: batching.max_batch is not a key of table "
     "[batching]: use 'enabled', 'max_device_batch_size', 'max_queue_delay_ms', "
     "'batch_buckets', 'max_queue_size'"),
    ("batching = 3", "config.toml: batching=3 is not a table"),
    ("[explain]\nmethod = 'lime'", "config.toml: explain.method='lime' is not allowed: use one "
     "of 'vanilla', 'gradcam', 'gradcam++', 'guided-gradcam', 'smoothgrad', "
     "'integrated-gradients', 'gradient-x-input'"),
    ("[explain]\nnoise = -0.1", "config.toml: explain.noise=-0.1 is not allowed: use a finite "
     "value >= 0"),
    ("[explain]\nnoise = nan", "config.toml: explain.noise=nan is not allowed"),
    ("[explain]\noutput_dtype = 'int8'", "config.toml: explain.output_dtype='int8' is not "
     "allowed: use one of 'float32', 'float16', 'uint8'"),
    ("[explain]\noutput_dtype = 'uint8'\nnormalize = false", "config.toml: "
     "explain.output_dtype='uint8' needs explain.normalize = true"),
    ("[explain]\ngrad_modifiers = []", "config.toml: explain.grad_modifiers=[] is empty"),
    ("[explain]\nkeepdims = true", "config.toml: explain.keepdims is not a key of table "
     "[explain]: use 'method', 'grad_modifiers', 'normalize', 'output_dtype', 'samples', "
     "'noise', 'steps'"),
    ("[limits]\nmax_samples = 8", "config.toml: limits.max_samples=8 is below the default "
     "samples, the built-in 16, so requests that leave samples unset would be refused: set "
     "explain.samples to at most 8"),
    ("[limits]\nmax_steps = 10\n[explain]\nsteps = 20", "config.toml: limits.max_steps=10 is "
     "below the default steps, explain.steps=20"),
    ("[limits]\nmax_batch_size = 8\n[batching]\nmax_queue_size = 4", "config.toml: "
     "batching.max_queue_size=4 is below limits.max_batch_size=8"),
    ("[limits]\nmax_request_cost = 800\n[batching]\nmax_queue_cost = 400", "config.toml: "
     "batching.max_queue_cost=400 is below limits.max_request_cost=800: the costliest request "
     "would never fit in the queue"),
    ("[limits]\nmax_map_bytes = 0", "config.toml: limits.max_map_bytes=0 is not allowed: use an "
     "integer of at least 1"),
    ("[batching]\nmax_call_cost = -1", "config.toml: batching.max_call_cost=-1 is not allowed: "
     "use an integer of at least 1"),
    ("[preprocess]\nchannel_order = 'grb'", "config.toml: preprocess.channel_order='grb' is not "
     "allowed: use one of 'rgb', 'bgr'"),
    ("[preprocess]\nresize = 'nearest'", "config.toml: preprocess.resize='nearest' is not "
     "allowed: use one of 'none', 'bilinear'"),
    ("[preprocess]\nscale = 'big'", "config.toml: preprocess.scale='big' is not allowed: use a "
     "finite number or a list of them (one per channel)"),
    ("[preprocess]\noffset = [1.0, inf]", "config.toml: preprocess.offset=[1.0, inf] is not "
     "allowed"),
    ("labels = ['a', '']", "config.toml: labels=['a', ''] is not allowed: use a list of "
     "non-empty strings"),
    ("labels = ['a']\nlabels_file = 'l.txt'", "config.toml: labels and labels_file are both set"),
    ("labels_output = 'probs'", "config.toml: labels_output='probs' is set without labels"),
    ("labels_file = '../secrets.txt'", "config.toml: labels_file='../secrets.txt' is not "
     "allowed: name a file inside the model directory"),
    ("labels_file = '/etc/passwd'", "config.toml: labels_file='/etc/passwd' is not allowed"),
    ("labels_file = 'missing.txt'", "config.toml: labels_file='missing.txt' does not exist in "
     "the model directory"),
    ("labels = [", "config.toml is not valid TOML:"),
    ("[inputs.image]\nwire_dtypes = ['int32']", "config.toml: inputs.image.wire_dtypes[0]="
     "'int32' is not allowed: use 'uint8'"),
    ("[inputs.image]\nwire_dtypes = 'uint8'", "config.toml: inputs.image.wire_dtypes='uint8' "
     "is not allowed: use a list of strings"),
    ("[inputs.image]\nwire_dtypes = ['uint8', 'uint8']", "config.toml: inputs.image."
     "wire_dtypes=['uint8', 'uint8'] lists a dtype twice"),
    ("[inputs.image]\nwire_range = 'unit'", "config.toml: inputs.image.wire_range='unit' is "
     "set without wire_dtypes: add wire_dtypes"),
    ("[inputs.image]\nwire_dtypes = ['uint8']\nwire_range = 'percent'", "config.toml: inputs."
     "image.wire_range='percent' is not allowed: use one of 'raw', 'unit'"),
    ("[inputs.image]\nwire_dtype = 'uint8'", "config.toml: inputs.image.wire_dtype is not a key "
     "of table [inputs.image]: use 'wire_dtypes', 'wire_range'"),
    ("inputs = 3", "config.toml: inputs=3 is not a table"),
    ("[inputs]\nimage = 'uint8'", "config.toml: inputs.image='uint8' is not a table"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m[13:60] for _, m in BAD])
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ModelConfigError, match=f"^{re.escape(message)}"):
        load_model_config(write(tmp_path, text))


def test_labels_file_must_not_leave_the_model_directory_by_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("a\nb\n")
    model_dir = write(tmp_path, "labels_file = 'labels.txt'")
    (model_dir / "labels.txt").symlink_to(outside)
    with pytest.raises(ModelConfigError, match="leads outside the model directory"):
        load_model_config(model_dir)


def test_labels_file_with_a_hole_names_the_line(tmp_path: Path) -> None:
    model_dir = write(tmp_path, "labels_file = 'l.txt'", **{"l.txt": "a\n\nc\n"})
    message = "labels_file='l.txt' has an empty line 2: write one label per line"
    with pytest.raises(ModelConfigError, match=re.escape(message)):
        load_model_config(model_dir)


def test_batching_overrides_replace_only_what_they_set() -> None:
    server = BatchingConfig(True, 32, 0.0, (1, 2, 4, 8, 16, 32), 256)
    assert BatchingOverrides().apply(server) == server
    assert BatchingOverrides(max_queue_delay_ms=3.0, max_queue_size=40).apply(
        server
    ) == BatchingConfig(True, 32, 0.003, (1, 2, 4, 8, 16, 32), 40)
    # A smaller device batch brings its own powers of two, unless buckets are given.
    assert BatchingOverrides(enabled=False, max_device_batch_size=6).apply(
        server
    ) == BatchingConfig(False, 6, 0.0, (1, 2, 4, 6), 256)
    assert BatchingOverrides(max_device_batch_size=6, batch_buckets=(3,)).apply(server).buckets == (
        3,
        6,
    )


def test_explain_defaults_fill_only_what_the_request_left_unset() -> None:
    defaults = ExplainDefaults(method="smoothgrad", samples=8, noise=0.3, normalize=False)
    request = ExplainOptions(
        method="vanilla", samples=0, noise=None, normalize=True, unset=frozenset({"samples"})
    )
    merged = defaults.apply(request)
    assert (merged.method, merged.samples, merged.noise, merged.normalize) == (
        "vanilla",
        8,
        None,
        True,
    )
    assert merged.unset == frozenset()
    everything = ExplainOptions(unset=frozenset({"method", "samples", "noise", "normalize"}))
    merged = defaults.apply(everything)
    assert (merged.method, merged.samples, merged.noise, merged.normalize) == (
        "smoothgrad",
        8,
        0.3,
        False,
    )
    assert ExplainDefaults().apply(everything) is everything


def test_model_limits_only_lower_the_servers() -> None:
    server = Limits(max_objectives=16, max_samples=128, max_steps=512)
    lowered = ModelLimits(max_batch_size=4, max_samples=32, max_steps=1000).apply(server)
    assert (lowered.max_objectives, lowered.max_samples, lowered.max_steps) == (16, 32, 512)
    assert lowered.whose("max_samples") == "the model's"
    assert lowered.whose("max_steps") == "the server's"
    assert ModelLimits(max_batch_size=4).batch_size(64) == 4
    assert ModelLimits(max_batch_size=100).batch_size(64) == 64
    assert ModelLimits().batch_size(64) == 64


def test_top_labels_name_the_arg_max_of_the_labelled_output() -> None:
    config = ModelConfig(labels=("cat", "dog", "bird"), labels_output="probs")
    logits = np.zeros((2, 5), np.float32)
    probs = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], np.float32)
    assert config.labelled_output(["logits", "probs"]) == 1
    assert config.top_labels(["logits", "probs"], [logits, probs]) == ["bird", "cat"]
    # A spatial output is scored by the mean over its spatial axes.
    maps = np.zeros((1, 2, 2, 3), np.float32)
    maps[0, 0, 0] = [5, 0, 0]
    maps[0, 1, :] = [0, 3, 0]
    assert ModelConfig(labels=("a", "b", "c")).top_labels(["m"], [maps]) == ["b"]
    assert ModelConfig().top_labels(["probs"], [probs]) == []


def test_the_demo_shapes_model_names_its_classes() -> None:
    from salience_server.demo import MODELS_DIR
    from salience_server.demo.data import SHAPE_CLASSES

    assert load_model_config(MODELS_DIR / "shapes").labels == SHAPE_CLASSES
    assert load_model_config(MODELS_DIR / "steering").input_config("image").wire_dtypes == (
        "uint8",
    )


def test_the_readme_example_is_a_valid_configuration(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### `config.toml`", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = load_model_config(write(tmp_path, example, **{"labels.txt": "a\nb\n"}))
    assert config.labels == ("a", "b")
    assert config.version_policy == VersionPolicy("latest", 1, ())
    assert config.explain.method == "smoothgrad"
    assert config.limits == ModelLimits(16, 4, 64, 256, 2**26, 2**26)
    assert config.batching.max_queue_cost == 2**28
    assert config.batching.max_call_cost == config.batching.light_request_cost == 2**24
    applied = config.batching.apply(BatchingConfig())
    assert (applied.max_queue_cost, applied.max_call_cost) == (2**28, 2**24)
    assert applied.light_request_cost == 2**24
    assert config.preprocess.offset == (-0.485, -0.456, -0.406)
