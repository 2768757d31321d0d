"""byol_wrapper.utils.checks, and the modules that moved their private checkers onto it."""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import byol_wrapper
from byol_wrapper.utils.checks import check_device, check_positive_int

PACKAGE = pathlib.Path(byol_wrapper.__file__).parent


def test_check_device():
    assert check_device("device", None) is None
    assert check_device("device", "cpu") == torch.device("cpu")
    assert check_device("device", torch.device("meta")) == torch.device("meta")
    for bad in ("gpu0", 1.5, object()):
        with pytest.raises(TypeError, match=r"^device must be a torch.device, a string such as 'cpu'"):
            check_device("device", bad)


def test_check_positive_int():
    assert check_positive_int("n", 3) == 3 and type(check_positive_int("n", np.int64(3))) is int
    with pytest.raises(ValueError, match=r"^n must be a positive int \(the world size\), got 0$"):
        check_positive_int("n", 0, what="the world size")
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="n must be a positive int"):
            check_positive_int("n", bad)
        with pytest.raises(ValueError, match="n must be a positive int"):
            check_positive_int("n", bad, error=ValueError)


MOVED = ("evaluate", "optim.py", "sem.py", "heads.py", "compat.py", "trainer.py")


def test_moved_modules_keep_no_private_checker():
    """Their checks live in utils/checks.py: no private ``_check_*`` / ``_positive_int`` / ``_resolve_device`` left."""
    offenders = []
    for entry in MOVED:
        path = PACKAGE / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.FunctionDef) and (
                    node.name.startswith(("_check_number", "_check_int", "_check_float", "_check_positive", "_check_temperature"))
                    or node.name in ("_positive_int", "_resolve_device")
                ):
                    offenders.append(f"{file.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "call, error, text",
    [
        # optim: a non-finite number is out of range (ValueError), a non-number the wrong kind (TypeError).
        (lambda: byol_wrapper.optim.LARS([nn.Parameter(torch.ones(1))], lr=math.nan), ValueError, "lr"),
        (lambda: byol_wrapper.optim.LARS([nn.Parameter(torch.ones(1))], lr=0.1, momentum="high"), TypeError, "momentum"),
        (lambda: byol_wrapper.optim.warmup_cosine_lr(0, 10, -1, 1.0), ValueError, "warmup_steps"),
        # byol-pytorch-style constructors: ValueError for every bad value, "must be a positive int".
        (lambda: byol_wrapper.MLP(0), ValueError, "dim must be a positive int"),
        (lambda: byol_wrapper.SimSiamMLP(4, hidden_size="8"), ValueError, "hidden_size must be a positive int"),
        (lambda: byol_wrapper.SEM(32, temperature=math.inf), ValueError, "temperature"),
        (lambda: byol_wrapper.SEM(32, dim_simplex=0), ValueError, "dim_simplex must be a positive int"),
        (lambda: byol_wrapper.MockDataset(8, 0), ValueError, "MockDataset: length must be a positive int"),
        # evaluate: the device argument.
        (lambda: byol_wrapper.evaluate.extract_features(nn.Flatten(), (torch.rand(2, 1, 2, 2), torch.arange(2)), device="gpu0"), TypeError, "device"),
        (lambda: byol_wrapper.evaluate.knn_accuracy(None, (torch.rand(2, 2), torch.arange(2)), (torch.rand(2, 2), torch.arange(2)), device=3.5), TypeError, "device"),
    ],
)
def test_moved_checks_through_the_public_api(call, error, text):
    import byol_wrapper.evaluate  # noqa: F401 - the lambdas reach it as an attribute
    import byol_wrapper.optim  # noqa: F401

    with pytest.raises(error, match=text):
        call()


def test_target_ema_updater_beta_range():
    learner = byol_wrapper.BYOL(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8, hidden_layer=-1,
                                projection_size=4, projection_hidden_size=8)
    learner.target_ema_updater.beta = np.float32(0.5)  # any real number in [0, 1]
    assert learner.tau == 0.5
    for bad in (1.5, math.nan, "0.9", True):
        with pytest.raises(ValueError, match="beta must be a float in"):
            learner.target_ema_updater.beta = bad
