"""The public API surface: names, version, typing marker, no asserts on user input."""

from __future__ import annotations

import ast
import importlib
import pathlib

import byol_wrapper

PACKAGE = pathlib.Path(byol_wrapper.__file__).parent

EXPECTED = {
    "BYOL", "BYOLView", "HiddenLayerExtractor", "IMAGENET_MEAN", "IMAGENET_STD", "MLP", "NetWrapper",
    "SimSiamMLP", "__version__", "byol_views", "copy_weights_", "cosine_tau", "ema_update_", "pool_features",
    "regression_loss", "symmetric_loss",
}


def test_all_is_explicit_and_importable():
    assert set(byol_wrapper.__all__) >= EXPECTED
    for name in byol_wrapper.__all__:
        assert getattr(byol_wrapper, name) is not None


def test_submodules_declare_all():
    for module in (
        "augmentations", "byol", "checkpoint", "data", "evaluate", "extractor", "heads", "loss", "momentum", "optim", "train",
    ):
        mod = importlib.import_module(f"byol_wrapper.{module}")
        assert mod.__all__, module
        for name in mod.__all__:
            assert hasattr(mod, name), f"{module}.{name}"


def test_version_single_source():
    from byol_wrapper._version import __version__

    assert byol_wrapper.__version__ == __version__
    assert __version__.count(".") >= 2


def test_py_typed_marker_shipped():
    assert (PACKAGE / "py.typed").exists()
    assert "py.typed" in (PACKAGE.parent / "setup.cfg").read_text()


def test_drop_in_signature_matches_byol_pytorch():
    import inspect

    params = list(inspect.signature(byol_wrapper.BYOL).parameters)
    assert params[:10] == [
        "net", "image_size", "hidden_layer", "projection_size", "projection_hidden_size", "augment_fn",
        "augment_fn2", "moving_average_decay", "use_momentum", "sync_batchnorm",
    ]
    forward = list(inspect.signature(byol_wrapper.BYOL.forward).parameters)
    assert forward == ["self", "x", "return_embedding", "return_projection"]
    for method in ("update_moving_average", "reset_moving_average"):
        assert callable(getattr(byol_wrapper.BYOL, method))


def test_library_code_never_asserts():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"use ValueError/TypeError, not assert: {offenders}"
