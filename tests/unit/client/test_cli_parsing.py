"""The `salience` command line without a server: option parsing, input loading
against model metadata, output naming and formatting, and exit statuses."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salience.v1 import salience_pb2 as pb
from salience_client.cli import main
from salience_client.cli.entry import parse_args
from salience_client.cli.models import format_models, models_json
from salience_client.cli.options import UsageError, parse_objective
from salience_client.cli.outputs import check_overlayable, explanation_arrays
from salience_client.cli.predict import format_predictions
from salience_client.client import Explanation, Objective
from salience_client.inputs import InputBatch, LoadedInput, load_input, load_inputs
from salience_client.inputs import InputSpec as Spec
from salience_client.overlay import overlay

EXPLAIN = ["explain", "--model", "m", "--out", "maps.npz", "x.npy"]


def metadata(
    shape: list[int], dtype: int = pb.DATA_TYPE_FLOAT32, name: str = "m"
) -> pb.ModelMetadata:
    return pb.ModelMetadata(
        name=name,
        versions=[1, 3],
        version=3,
        inputs=[pb.TensorSpec(name="image", dtype=dtype, shape=shape)],
        outputs=[pb.TensorSpec(name="probs", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 4])],
    )


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs main, asserts exit status 2 and no traceback, returns stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --objective ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("predictions:2", Objective("predictions", (2,), 1.0)),
        ("3:0,4", Objective(3, (0, 4), 1.0)),
        ("-1:1", Objective(-1, (1,), 1.0)),
        ("conv1:", Objective("conv1", (), 1.0)),
        ("conv1::0.5", Objective("conv1", (), 0.5)),
        ("predictions:2:-1", Objective("predictions", (2,), -1.0)),
        (":1,2", Objective(None, (1, 2), 1.0)),
        ("block_2:1: 2.5e-1", Objective("block_2", (1,), 0.25)),
    ],
)
def test_objective_parses_layer_indices_and_weight(text: str, expected: Objective) -> None:
    got = parse_objective(text)
    assert got == expected
    assert type(got.layer) is type(expected.layer)


def test_objectives_repeat_in_order_with_negative_values() -> None:
    args = parse_args(
        [*EXPLAIN, "--objective", "predictions:2:-1", "--objective=-2:", "--objective", "dense:0,1"]
    )
    assert args.objectives == [
        Objective("predictions", (2,), -1.0),
        Objective(-2, (), 1.0),
        Objective("dense", (0, 1), 1.0),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("predictions", "malformed"),
        ("a:1:2:3", "malformed"),
        ("a:one", "indices 'one'"),
        ("a:1,,2", "indices '1,,2'"),
        ("a:1:heavy", "weight 'heavy'"),
        ("a:1:", "weight ''"),
        ("a:1:inf", "finite"),
    ],
)
def test_malformed_objective_exits_2_with_a_message(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error([*EXPLAIN, f"--objective={text}"], capsys)
    assert "--objective" in err
    assert message in err
    assert repr(text) in err


def test_objective_with_layer_or_filter_indices_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for extra in (["--layer", "dense"], ["--filter-indices", "1"], ["--layer=-1"]):
        err = usage_error([*EXPLAIN, "--objective", "dense:1", *extra], capsys)
        assert "--objective cannot be combined" in err


# Other explain options ------------------------------------------------------------


def test_layer_is_an_index_when_it_parses_as_an_int_else_a_name() -> None:
    assert parse_args([*EXPLAIN, "--layer", "3"]).layer == 3
    assert parse_args([*EXPLAIN, "--layer", "-2"]).layer == -2
    assert parse_args([*EXPLAIN, "--layer=-2"]).layer == -2
    assert parse_args([*EXPLAIN, "--layer", "conv_1"]).layer == "conv_1"
    assert parse_args(EXPLAIN).layer is None


def test_filter_indices_are_a_comma_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([*EXPLAIN, "--filter-indices", "1,3"]).filter_indices == (1, 3)
    assert parse_args([*EXPLAIN, "--filter-indices", "7"]).filter_indices == (7,)
    assert "'1,x'" in usage_error([*EXPLAIN, "--filter-indices", "1,x"], capsys)


def test_grad_modifiers_are_comma_lists_that_repeat_in_order() -> None:
    args = parse_args([*EXPLAIN, "--grad-modifier", "none,absolute", "--grad-modifier", "relu"])
    assert args.grad_modifiers == ["none", "absolute", "relu"]
    assert parse_args(EXPLAIN).grad_modifiers == []


def test_bad_grad_modifier_lists_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert "'none,,relu'" in usage_error([*EXPLAIN, "--grad-modifier", "none,,relu"], capsys)
    err = usage_error([*EXPLAIN, "--grad-modifier", "none,relu", "--grad-modifier", "none"], capsys)
    assert "'none' twice" in err


def test_flags_and_defaults() -> None:
    args = parse_args(EXPLAIN)
    assert (args.keepdims, args.no_normalize, args.keep_activation) == (False, False, False)
    assert (args.output_dtype, args.colormap, args.alpha, args.version) == (
        "float32",
        "jet",
        0.5,
        0,
    )
    assert args.timeout == 60
    args = parse_args(
        [*EXPLAIN, "--keepdims", "--no-normalize", "--keep-activation", "--output-dtype",
         "float16", "--alpha", "0.25", "--version", "2", "--timeout", "5"]
    )  # fmt: skip
    assert (args.keepdims, args.no_normalize, args.keep_activation) == (True, True, True)
    assert (args.output_dtype, args.alpha, args.version, args.timeout) == ("float16", 0.25, 2, 5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "1.5"], "alpha=1.5"),
        (["--output-dtype", "int8"], "--output-dtype"),
        (["--timeout", "0"], "--timeout"),
        (["--version", "-1"], "--version"),
    ],
)
def test_bad_option_values_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error([*EXPLAIN, *extra], capsys)


def test_explain_needs_out_and_an_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--out" in usage_error(["explain", "--model", "m", "x.npy"], capsys)
    assert "INPUT" in usage_error(["explain", "--model", "m", "--out", "o.npz"], capsys)


def test_target_defaults_to_the_environment_then_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SALIENCE_TARGET", raising=False)
    assert parse_args(["models"]).target == "localhost:50051"
    monkeypatch.setenv("SALIENCE_TARGET", "svc:9000")
    assert parse_args(["models"]).target == "svc:9000"
    assert parse_args(["models", "--target", "other:1"]).target == "other:1"


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "explain" in capsys.readouterr().out
    assert main(["explain", "--help"]) == 0
    assert "--grad-modifier" in capsys.readouterr().out


# Inputs ---------------------------------------------------------------------------


def test_npy_sample_gets_a_batch_axis_and_the_model_float_dtype(tmp_path: Path) -> None:
    sample = np.random.default_rng(0).uniform(size=(4, 5, 3))  # float64
    np.save(tmp_path / "s.npy", sample)
    loaded = load_input(tmp_path / "s.npy", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    assert loaded.array.dtype == np.float32
    assert loaded.array.shape == (1, 4, 5, 3)
    assert not loaded.batched
    np.testing.assert_array_equal(loaded.array[0], sample.astype(np.float32))


def test_npy_batch_is_kept_and_inputs_are_concatenated(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batch = rng.uniform(size=(3, 4, 5, 3)).astype(np.float32)
    sample = rng.uniform(size=(4, 5, 3)).astype(np.float32)
    np.save(tmp_path / "b.npy", batch)
    np.save(tmp_path / "s.npy", sample)
    loaded = load_inputs([tmp_path / "s.npy", tmp_path / "b.npy"], metadata([-1, 4, 5, 3]))
    assert [s.batched for s in loaded.sources] == [False, True]
    np.testing.assert_array_equal(loaded.array, np.concatenate([sample[None], batch]))
    assert loaded.labels() == ["s.npy", "b.npy[0]", "b.npy[1]", "b.npy[2]"]


def test_free_dimensions_accept_any_size(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.zeros((7, 2, 3), dtype=np.float32))
    loaded = load_input(tmp_path / "s.npy", Spec.from_metadata(metadata([-1, -1, -1, 3])))
    assert loaded.array.shape == (1, 7, 2, 3)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((5, 3), "has shape [5, 3]"),
        ((4, 6, 3), "has shape [4, 6, 3]"),
        ((2, 4, 5, 1), "[2, 4, 5, 1]"),
    ],
)
def test_npy_of_the_wrong_shape_names_both_shapes(
    tmp_path: Path, shape: tuple[int, ...], message: str
) -> None:
    np.save(tmp_path / "x.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(UsageError, match="model 'm'") as err:
        load_input(tmp_path / "x.npy", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    assert message in str(err.value)
    assert "[N, 4, 5, 3]" in str(err.value)


def test_npy_dtypes_that_would_change_meaning_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.full((4, 5, 3), 0.5))
    with pytest.raises(UsageError, match=r"float64 values.*takes uint8"):
        load_input(
            tmp_path / "f.npy", Spec.from_metadata(metadata([-1, 4, 5, 3], pb.DATA_TYPE_UINT8))
        )
    np.save(tmp_path / "i.npy", np.full((4, 5, 3), 300))
    with pytest.raises(UsageError, match=r"int64 values.*takes uint8"):
        load_input(
            tmp_path / "i.npy", Spec.from_metadata(metadata([-1, 4, 5, 3], pb.DATA_TYPE_UINT8))
        )
    np.save(tmp_path / "ok.npy", np.full((4, 5, 3), 200))
    loaded = load_input(
        tmp_path / "ok.npy", Spec.from_metadata(metadata([-1, 4, 5, 3], pb.DATA_TYPE_UINT8))
    )
    assert loaded.array.dtype == np.uint8
    assert int(loaded.array.max()) == 200


def test_rgb_image_is_scaled_to_unit_float32(tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    loaded = load_input(tmp_path / "a.png", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    assert loaded.array.dtype == np.float32
    assert loaded.array.shape == (1, 4, 5, 3)
    np.testing.assert_allclose(loaded.array[0], pixels / 255.0, rtol=0, atol=1e-7)
    assert loaded.array.min() >= 0.0
    assert loaded.array.max() <= 1.0


def test_image_is_converted_to_the_model_channel_count(tmp_path: Path) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    grey = load_input(tmp_path / "rgb.png", Spec.from_metadata(metadata([-1, 4, 5, 1])))
    expected = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32) / 255
    assert grey.array.shape == (1, 4, 5, 1)
    np.testing.assert_allclose(grey.array[0, ..., 0], expected, atol=1e-7)
    flat = load_input(tmp_path / "rgb.png", Spec.from_metadata(metadata([-1, 4, 5])))
    assert flat.array.shape == (1, 4, 5)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "l.png")
    rgb = load_input(tmp_path / "l.png", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    np.testing.assert_allclose(rgb.array[0], np.repeat(pixels[..., :1], 3, -1) / 255, atol=1e-7)


def test_image_for_a_uint8_model_stays_0_to_255(tmp_path: Path) -> None:
    pixels = np.arange(60, dtype=np.uint8).reshape(4, 5, 3) * 4
    Image.fromarray(pixels).save(tmp_path / "a.png")
    loaded = load_input(
        tmp_path / "a.png", Spec.from_metadata(metadata([-1, 4, 5, 3], pb.DATA_TYPE_UINT8))
    )
    np.testing.assert_array_equal(loaded.array[0], pixels)


def test_image_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(UsageError) as err:
        load_input(tmp_path / "wide.png", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    assert "6×4" in str(err.value)
    assert "5×4" in str(err.value)


def test_image_for_a_model_without_image_input_says_to_use_npy(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UsageError, match=r"not an image.*\.npy"):
        load_input(tmp_path / "a.png", Spec.from_metadata(metadata([-1, 10])))


def test_unreadable_and_multi_input_cases_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match=r"neither a \.npy file nor an image"):
        load_input(tmp_path / "junk.png", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(UsageError, match="cannot read"):
        load_input(tmp_path / "junk.npy", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    with pytest.raises(UsageError, match="does not exist"):
        load_input(tmp_path / "missing.npy", Spec.from_metadata(metadata([-1, 4, 5, 3])))
    two = metadata([-1, 4])
    two.inputs.append(pb.TensorSpec(name="other", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 2]))
    with pytest.raises(UsageError, match="2 inputs"):
        Spec.from_metadata(two)


def test_missing_input_exits_2_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The target is unreachable: the file check must come first.
    argv = ["predict", "--target", "127.0.0.1:1", "--model", "m", str(tmp_path / "gone.npy")]
    err = usage_error(argv, capsys)
    assert "gone.npy does not exist" in err


def test_explain_to_a_directory_needs_image_inputs() -> None:
    check_overlayable(InputBatch(np.zeros((1, 4, 5, 3)), []), keepdims=False)
    check_overlayable(InputBatch(np.zeros((1, 4, 5)), []), keepdims=True)
    with pytest.raises(UsageError, match=r"not images.*--out FILE\.npz"):
        check_overlayable(InputBatch(np.zeros((1, 10)), []), keepdims=False)
    with pytest.raises(UsageError, match="--keepdims"):
        check_overlayable(InputBatch(np.zeros((1, 4, 5)), []), keepdims=False)


# Outputs --------------------------------------------------------------------------


def test_models_listing_shows_free_dims_and_dtype_names() -> None:
    listing = [metadata([-1, 4, 5, 3])]
    assert models_json(listing) == [
        {
            "name": "m",
            "versions": [1, 3],
            "version": 3,
            "inputs": [{"name": "image", "dtype": "float32", "shape": [None, 4, 5, 3]}],
            "outputs": [{"name": "probs", "dtype": "float32", "shape": [None, 4]}],
            "max_batch_size": 0,
            "version_status": [],
        }
    ]
    json.dumps(models_json(listing))  # serialisable as is
    text = "\n".join(format_models(listing))
    assert "m  version 3 (served: 1, 3)" in text
    assert "image" in text
    assert "float32" in text
    assert "[N, 4, 5, 3]" in text


def test_models_listing_shows_versions_that_are_not_simply_served() -> None:
    listing = metadata([-1, 4])
    listing.version_status.extend(
        [
            pb.VersionStatus(version=0, state=pb.VERSION_STATE_FAILED, reason="bad toml"),
            pb.VersionStatus(version=1, state=pb.VERSION_STATE_UNLOADING),
            pb.VersionStatus(version=3, state=pb.VERSION_STATE_READY),
            pb.VersionStatus(version=4, state=pb.VERSION_STATE_LOADING),
            pb.VersionStatus(version=5, state=pb.VERSION_STATE_FAILED, reason="not a zip"),
        ]
    )
    assert format_models([listing])[1:5] == [
        "  config.toml: failed: bad toml",
        "  version 1: unloading",
        "  version 4: loading",
        "  version 5: failed: not a zip",
    ]
    assert models_json([listing])[0]["version_status"][-1] == {
        "version": 5,
        "state": "failed",
        "reason": "not a zip",
    }


def test_predictions_name_the_argmax_of_probability_outputs_only() -> None:
    outputs = {
        "probs": np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32),
        "logits": np.array([[1.0, 3.0, -2.0], [0.0, 0.0, 9.0]], dtype=np.float32),
    }
    lines = format_predictions(outputs, ["a.png", "b.npy[0]"])
    assert len(lines) == 4
    assert lines[0].startswith("a.png  probs:")
    assert lines[0].endswith("argmax 1 (0.7000)")
    assert lines[2].startswith("b.npy[0]  probs:")
    assert lines[2].endswith("argmax 0 (0.5000)")
    assert "argmax" not in lines[1]
    assert "argmax" not in lines[3]


def explanation(maps: dict[str, np.ndarray]) -> Explanation:
    outputs = {"logits": np.zeros((3, 2), np.float32), "probs": np.ones((3, 2), np.float32)}
    return Explanation(
        outputs=outputs, maps=maps, model_version=1, resolved=pb.ResolvedExplanation()
    )


def test_explanation_npz_arrays() -> None:
    one = explanation({"absolute": np.zeros((3, 4, 5))})
    arrays = explanation_arrays(one)
    assert set(arrays) == {"predictions", "output_logits", "output_probs", "saliency",
                           "saliency_absolute"}  # fmt: skip
    assert arrays["predictions"] is one.outputs["logits"]
    assert arrays["saliency"] is one.maps["absolute"]
    two = explanation_arrays(explanation({"none": np.zeros(1), "relu": np.ones(1)}))
    assert "saliency" not in two
    assert {"saliency_none", "saliency_relu"} <= set(two)


def test_overlays_are_named_by_input_sample_and_modifier(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(4, 4, 5, 3)).astype(np.float32)
    sources = [
        LoadedInput(Path("in/cat.png"), images[:1], batched=False),
        LoadedInput(Path("in/batch.npy"), images[1:3], batched=True),
        LoadedInput(Path("other/cat.npy"), images[3:], batched=False),  # same stem
    ]
    maps = {"absolute": rng.uniform(size=(4, 4, 5)), "relu": rng.uniform(size=(4, 4, 5))}
    result = Explanation(
        outputs={"p": np.zeros((4, 2))},
        maps=maps,
        model_version=1,
        resolved=pb.ResolvedExplanation(),
    )
    from salience_client.cli.outputs import write_overlays

    written = write_overlays(
        tmp_path / "out", InputBatch(images, sources), result, colormap="magma", alpha=0.4
    )
    names = [p.name for p in written]
    assert names == [
        "cat_absolute.png", "cat_relu.png",
        "batch_0_absolute.png", "batch_0_relu.png", "batch_1_absolute.png", "batch_1_relu.png",
        "cat-2_absolute.png", "cat-2_relu.png",
    ]  # fmt: skip
    with Image.open(tmp_path / "out" / "batch_1_relu.png") as png:
        got = np.asarray(png)
    np.testing.assert_array_equal(
        got, overlay(images[2], maps["relu"][2], colormap="magma", alpha=0.4)
    )


# Exit statuses --------------------------------------------------------------------


def test_unreachable_server_prints_the_target_and_a_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["models", "--target", f"127.0.0.1:{port}", "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: ")
    assert f"127.0.0.1:{port}" in err
    assert "hint:" in err
    assert "Traceback" not in err


def test_serve_bad_setting_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "port=70000" in capsys.readouterr().err


def test_serve_without_the_server_extra_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry makes `import salience_server.app` raise ImportError, as it does
    # when TensorFlow or another server dependency is not installed.
    monkeypatch.setitem(sys.modules, "salience_server.app", None)
    assert main(["serve", "--model-repository", str(tmp_path)]) == 1
    assert "pip install 'salience[server]'" in capsys.readouterr().err


def test_importing_the_cli_loads_neither_tensorflow_nor_the_server() -> None:
    import subprocess

    code = (
        "import sys, salience_client.cli.entry, salience_client.overlay\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'keras', 'salience_server', 'matplotlib'})\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# models --wait ----------------------------------------------------------------------


def test_readiness_settles_when_nothing_loads_and_is_ready_when_nothing_failed() -> None:
    from salience_client.cli.models import Readiness

    def model(name: str, *states: int) -> pb.ModelMetadata:
        statuses = [pb.VersionStatus(version=v + 1, state=s) for v, s in enumerate(states)]
        return pb.ModelMetadata(name=name, version_status=statuses)

    loading = Readiness.of([model("a", pb.VERSION_STATE_READY, pb.VERSION_STATE_LOADING)])
    assert (loading.settled, loading.ready) == (False, False)
    assert loading.settling == ["a version 2 (loading)"]
    failed = Readiness.of([model("a", pb.VERSION_STATE_READY), model("b", pb.VERSION_STATE_FAILED)])
    assert (failed.settled, failed.ready, failed.failed) == (True, False, ["b version 1 (failed)"])
    ready = Readiness.of([model("a", pb.VERSION_STATE_READY, pb.VERSION_STATE_READY)])
    assert (ready.settled, ready.ready) == (True, True)
    unloading = Readiness.of([model("a", pb.VERSION_STATE_UNLOADING)])
    assert unloading.settling == ["a version 1 (unloading)"]


def test_wait_on_a_port_nothing_listens_on_ends_unavailable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["models", "--wait", "1", "--target", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE: no answer within --wait 1 s (")
    assert f"hint: no salience server answered at 127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_wait_takes_an_optional_number_of_seconds() -> None:
    assert parse_args(["models"]).wait is None
    assert parse_args(["models", "--wait"]).wait == 300.0
    assert parse_args(["models", "--wait", "2.5"]).wait == 2.5
    with pytest.raises(SystemExit):
        parse_args(["models", "--wait", "0"])


def test_the_help_names_every_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 on success, 1 when the server answers with an error" in text
    assert "2 for a usage error" in text
    assert "3 when `salience models --wait` finds a model failed or still loading" in text
    assert main(["models", "--help"]) == 0
    assert "exit status 3 when one failed or is still loading" in " ".join(
        capsys.readouterr().out.split()
    )


def test_forward_pass_method_flags_become_explain_options() -> None:
    from salience_client.cli.explanation_options import explanation_options

    options = explanation_options(parse_args(EXPLAIN))
    assert (options["chunk_size"], options["top_channels"]) == (0, 0)
    assert (options["window"], options["stride"], options["occlusion_value"]) == (0, 0, None)
    args = parse_args(
        [*EXPLAIN, "--method", "occlusion", "--chunk-size", "32", "--top-channels", "4",
         "--window", "8", "--stride", "3", "--occlusion-value", "-0.5"]
    )  # fmt: skip
    options = explanation_options(args)
    assert options["method"] == "occlusion"
    assert (options["chunk_size"], options["top_channels"]) == (32, 4)
    assert (options["window"], options["stride"], options["occlusion_value"]) == (8, 3, -0.5)
    from salience_client.client import explanation_request

    e = explanation_request("m", np.zeros((1, 4, 4, 1), np.float32), **options).explanation
    assert (e.chunk_size, e.top_channels, e.window, e.stride) == (32, 4, 8, 3)
    assert e.HasField("occlusion_value")
    assert e.occlusion_value == -0.5
