"""The public API surface: names, version, typing marker, no asserts on user input."""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil

import pytest

import byol_wrapper

PACKAGE = pathlib.Path(byol_wrapper.__file__).parent

# The public API, frozen (the kornia / langchain habit): every public module and the names its ``__all__``
# promises. A name removed or renamed breaks users; one added must be added here on purpose, with a CHANGELOG line.
SURFACE: dict[str, set[str]] = {
    "byol_wrapper": {
        "BYOL", "BYOLTrainer", "BYOLView", "EMA", "HiddenLayerExtractor", "IMAGENET_MEAN", "IMAGENET_STD", "MLP",
        "MockDataset", "NetWrapper", "RandomApply", "SEM", "SimSiamMLP", "__version__", "byol_views", "copy_weights_",
        "cosine_tau", "ema_update_", "pool_features", "regression_loss", "symmetric_loss",
    },
    "byol_wrapper.augmentations": {"BYOLView", "IMAGENET_MEAN", "IMAGENET_STD", "blur_kernel_size", "byol_views", "to_float_image"},
    "byol_wrapper.augmentations.geometric": {"crop_boxes", "resized_crop"},
    "byol_wrapper.augmentations.images": {"INTEGER_IMAGE_DTYPES", "check_image_dtype", "check_images", "float32_image", "not_a_tensor_error", "to_float_image"},
    "byol_wrapper.augmentations.intensity": {
        "BRIGHTNESS", "CONTRAST", "HUE", "JITTER_NAMES", "SATURATION", "blur_kernel_size", "color_jitter", "gaussian_blur",
        "grayscale", "hue", "jitter_factors", "jitter_positions", "solarize",
    },
    "byol_wrapper.augmentations.normalize": {"IMAGENET_MEAN", "IMAGENET_STD", "LUMA_WEIGHTS", "default_normalization"},
    "byol_wrapper.augmentations.params": {"CROP_TRIALS", "ViewParams"},
    "byol_wrapper.augmentations.views": {"BYOLView", "byol_views"},
    "byol_wrapper.byol": {"BYOL", "NetWrapper"},
    "byol_wrapper.byol_pytorch": {
        "BYOL", "EMA", "MLP", "MaybeSyncBatchnorm", "NetWrapper", "RandomApply", "SEM", "SimSiamMLP", "cosine_loss_fn",
        "default", "divisible_by", "exists", "flatten", "get_module_device", "kl_loss_fn", "l2norm", "loss_fn",
        "set_requires_grad", "singleton", "update_moving_average",
    },
    "byol_wrapper.cache": {"CACHE_VERSION", "ImageCache", "cache_bytes", "open_cache"},
    "byol_wrapper.channels": {"LUMA_WEIGHTS", "adapt_first_conv", "channel_mismatch_message", "default_normalization"},
    "byol_wrapper.checkpoint": {
        "CHECKPOINT_FORMAT", "CheckpointError", "CheckpointUnreadableError", "ForeignCheckpointError", "atomic_save",
        "load_checkpoint", "load_latest_checkpoint", "nonfinite_entries", "previous_path", "remove_stale_temporaries",
        "rng_state", "save_checkpoint", "set_aside", "set_rng_state", "state_digest",
    },
    "byol_wrapper.compat": {"EMA", "LearnerEMA", "adapt_state_dict", "is_compiling", "warn_if_outside_unit_range"},
    "byol_wrapper.data": {
        "EpochSampler", "IMAGE_EXTENSIONS", "ImageFolderDataset", "LabelledImageFolder", "collate_pairs",
        "collate_skip_none", "find_images",
    },
    "byol_wrapper.decode": {
        "DECODE_CHOICES", "EncodedImages", "FastDecode", "GPUDecodedBatches", "apply_orientation", "collate_encoded",
        "decode_image_file", "gpu_decode_error", "resolve_decode",
    },
    "byol_wrapper.demo": {
        "DEMO_CLASSES", "DEMO_CONFIG", "SmallCNN", "build_demo_backbone", "generate_demo_dataset", "load_demo_split",
        "run_demo_experiment",
    },
    "byol_wrapper.backbones": {"SmallCNN", "apply_cifar_stem", "build_backbone"},
    "byol_wrapper.engine": {
        "PRECISIONS", "Schedule", "StepResult", "autocast", "grad_scaler", "resolve_device", "resolve_precision", "train_step",
    },
    "byol_wrapper.cli": {"EXIT_DIVERGED", "main"},
    "byol_wrapper.cli.args": {"PROG", "UsageError", "apply_demo", "build_parser", "check_augment_kwargs", "default_threads"},
    "byol_wrapper.cli.metrics": {"plot_metrics", "progress_bar", "read_metrics", "truncate_metrics"},
    "byol_wrapper.cli.plan": {"BASE_LR", "DEFAULT_WEIGHT_DECAY", "Plan", "default_load_size", "make_plan"},
    "byol_wrapper.cli.runtime": {
        "EXIT_DIVERGED", "Ranks", "autocast", "grad_scaler", "lock_out", "resolve_precision", "select_device", "start_ranks",
    },
    "byol_wrapper.cli.trainer": {"MODEL_KEYS", "Trainer"},
    "byol_wrapper.distributed": {"params_to_ignore", "unused_parameters", "unwrap", "update_moving_average"},
    "byol_wrapper.evaluate": {"collapse_stats", "extract_features", "knn_accuracy", "knn_predict", "linear_probe"},
    "byol_wrapper.evaluate.collapse": {"collapse_stats"},
    "byol_wrapper.evaluate.features": {"extract_features"},
    "byol_wrapper.evaluate.knn": {"knn_accuracy", "knn_predict"},
    "byol_wrapper.evaluate.linear": {"linear_probe"},
    "byol_wrapper.extractor": {
        "HiddenLayerExtractor", "LayerSpec", "OutputKey", "RepresentationProbe", "pool_features", "preserved_state",
        "probe_representation", "resolve_layer", "select_output",
    },
    "byol_wrapper.heads": {"MLP", "SimSiamMLP", "batchnorm_class"},
    "byol_wrapper.image_io": {"ARRAY_EXTENSIONS", "ChannelMismatchError", "load_image", "read_array"},
    "byol_wrapper.lock": {"LOCK_NAME", "RunLock", "RunLockedError"},
    "byol_wrapper.loss": {"regression_loss", "symmetric_loss"},
    "byol_wrapper.momentum": {"BufferPolicy", "EMAPlan", "apply_ema_", "copy_weights_", "cosine_tau", "ema_update_", "make_ema_plan"},
    "byol_wrapper.optim": {"LARS", "OPTIMIZERS", "build_optimizer", "is_excluded_parameter", "param_groups", "warmup_cosine_lr"},
    "byol_wrapper.pipeline": {"fast_loader"},
    "byol_wrapper.plot": {"COLLAPSE_STD_RATIO", "health_warnings", "read_metrics", "render_metrics_png"},
    "byol_wrapper.sem": {"SEM", "sem_projector"},
    "byol_wrapper.train": {
        "MODEL_KEYS", "apply_cifar_stem", "build_backbone", "build_parser", "default_threads", "main", "plot_metrics",
    },
    "byol_wrapper.trainer": {"BYOLTrainer", "MockDataset"},
    "byol_wrapper.utils": {"checks"},
    "byol_wrapper.utils.checks": {
        "check_choice", "check_device", "check_dir", "check_float", "check_int", "check_pair", "check_positive_int",
        "check_probability", "check_size", "check_stats", "is_int", "is_real",
    },
}

# Importable from these paths although not in ``__all__`` (type aliases users annotate with): kept when modules move.
ALSO_IMPORTABLE = {"byol_wrapper.evaluate": {"DataLike", "DeviceLike"}}


def _public_modules() -> list[str]:
    """Every module of the package whose dotted path has no ``_``-prefixed part (subpackages included)."""
    found = [
        info.name
        for info in pkgutil.walk_packages([str(PACKAGE)], "byol_wrapper.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    return ["byol_wrapper", *sorted(found)]


def test_every_public_module_declares_all_and_every_name_imports():
    for module in _public_modules():
        mod = importlib.import_module(module)
        names = getattr(mod, "__all__", None)
        assert isinstance(names, (list, tuple)) and names, f"{module} has no __all__"
        assert len(set(names)) == len(names), f"{module}.__all__ repeats a name"
        for name in names:
            assert getattr(mod, name, None) is not None, f"{module}.{name}"


def test_every_public_module_is_in_the_surface():
    missing = sorted(set(_public_modules()) - set(SURFACE))
    assert not missing, f"public modules not in tests/test_api.py SURFACE (add their __all__ there): {missing}"
    gone = sorted(set(SURFACE) - set(_public_modules()))
    assert not gone, f"public modules users import that no longer exist: {gone}"


@pytest.mark.parametrize("module", sorted(SURFACE))
def test_public_api_surface(module):
    mod = importlib.import_module(module)
    names = set(mod.__all__)
    assert not SURFACE[module] - names, f"{module} lost public names: {sorted(SURFACE[module] - names)}"
    assert not names - SURFACE[module], f"{module} has new public names (add them to SURFACE): {sorted(names - SURFACE[module])}"
    for name in ALSO_IMPORTABLE.get(module, ()):
        assert getattr(mod, name, None) is not None, f"{module}.{name}"


def test_evaluate_names_are_the_same_objects_as_in_their_concept_modules():
    from byol_wrapper import evaluate
    from byol_wrapper.evaluate import collapse, features, knn, linear

    for home in (collapse, features, knn, linear):
        for name in home.__all__:
            assert getattr(evaluate, name) is getattr(home, name), name
    assert {n for home in (collapse, features, knn, linear) for n in home.__all__} == set(evaluate.__all__)


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
