"""Coming from byol-pytorch: its public names, its README snippets, its checkpoints and its habits.

byol-pytorch 0.9.1 is installed by the ``[test]`` extra and produces the state dicts and reference outputs
here; byol-pytorch 0.8.2's state dict is the committed fixture ``tests/fixtures/byol_pytorch_0.8.2_state.pt``
(made by ``tests/fixtures/make_byol_pytorch_state.py`` with byol-pytorch 0.8.2 itself).
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import random
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import byol_wrapper
import byol_wrapper.byol_pytorch as ours
from byol_wrapper import BYOL

bp = pytest.importorskip("byol_pytorch.byol_pytorch")  # in the [test] extra: runs in CI
import byol_pytorch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_byol_pytorch_state import CONFIG, tiny_net  # noqa: E402

sys.path.remove(str(FIXTURES))


def small_cnn() -> nn.Module:
    """A ResNet-shaped small CNN: ``layer4`` gives 4-D maps, ``avgpool`` and ``fc`` as in torchvision."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), relu=nn.ReLU(),
        layer4=nn.Conv2d(8, 16, 3, stride=2, padding=1), avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(), fc=nn.Linear(16, 10),
    ))


def byol_pytorch_learner(net: nn.Module, **kwargs) -> "bp.BYOL":
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bp.BYOL(net, **kwargs)


def train_briefly(learner: nn.Module, size: int, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        loss = learner(torch.rand(4, 3, size, size))
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()


# ---------------------------------------------------------------------------------------------- names
def _public_names(module) -> list[str]:
    return sorted(
        name for name, obj in vars(module).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
    )


def test_every_public_name_of_byol_pytorch_module_is_importable_with_its_parameters():
    names = _public_names(bp)
    assert {"EMA", "RandomApply", "SEM", "NetWrapper", "MLP", "update_moving_average", "kl_loss_fn"} <= set(names)
    for name in [*names, "loss_fn"]:  # loss_fn: byol-pytorch 0.8's name of cosine_loss_fn
        assert name in ours.__all__, name
        theirs_obj = getattr(bp, name, None) or getattr(bp, "cosine_loss_fn")
        if inspect.isfunction(theirs_obj) or inspect.isclass(theirs_obj):
            theirs = list(inspect.signature(theirs_obj).parameters)
            mine = list(inspect.signature(getattr(ours, name)).parameters)
            assert mine[: len(theirs)] == theirs, (name, mine, theirs)


def test_top_level_names_of_byol_pytorch_exist():
    for name in [n for n in dir(byol_pytorch) if not n.startswith("_") and n not in ("byol_pytorch", "trainer")]:
        assert hasattr(byol_wrapper, name), name
    for name in ("RandomApply", "BYOLTrainer", "MockDataset", "SEM", "EMA"):
        assert name in byol_wrapper.__all__
    sig = inspect.signature(byol_pytorch.BYOLTrainer.__init__).parameters
    mine = inspect.signature(byol_wrapper.BYOLTrainer.__init__).parameters
    for name, p in sig.items():
        assert name in mine and mine[name].kind == p.kind, name
        if p.default is not inspect.Parameter.empty and not isinstance(p.default, dict):
            assert mine[name].default == p.default, name


def test_importing_the_package_does_not_import_accelerate():
    import subprocess

    code = "import sys, byol_wrapper; from byol_wrapper import BYOLTrainer; print('accelerate' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_small_helpers_match_byol_pytorch():
    torch.manual_seed(0)
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    for name in ("l2norm", "flatten"):
        torch.testing.assert_close(getattr(ours, name)(x), getattr(bp, name)(x))
    torch.testing.assert_close(ours.cosine_loss_fn(x, y), bp.cosine_loss_fn(x, y))
    torch.testing.assert_close(ours.loss_fn(x, y), bp.cosine_loss_fn(x, y))
    p, q = x.softmax(-1), y.softmax(-1)
    torch.testing.assert_close(ours.kl_loss_fn(p, q), bp.kl_loss_fn(p, q))
    assert ours.default(None, 3) == bp.default(None, 3) == 3 and ours.default(0, 3) == 0
    assert ours.exists(0) and not ours.exists(None)
    assert ours.divisible_by(12, 4) and not ours.divisible_by(12, 5)
    assert ours.MaybeSyncBatchnorm() is bp.MaybeSyncBatchnorm() is nn.BatchNorm1d
    assert ours.MaybeSyncBatchnorm(True) is nn.SyncBatchNorm
    net = nn.Linear(2, 2)
    ours.set_requires_grad(net, False)
    assert not any(p.requires_grad for p in net.parameters())
    assert ours.get_module_device(net) == torch.device("cpu")
    with pytest.raises(ValueError, match="no parameters"):
        ours.get_module_device(nn.ReLU())
    e = ours.EMA(0.9)
    torch.testing.assert_close(e.update_average(x, y), bp.EMA(0.9).update_average(x, y))
    assert e.update_average(None, y) is y

    class Cached:
        value = None

        @ours.singleton("value")
        def get(self):
            return object()

    c = Cached()
    assert c.get() is c.get() is c.value


def test_update_moving_average_function_matches_byol_pytorch_with_fused_and_custom_updaters():
    torch.manual_seed(0)
    online, ma = nn.Linear(4, 3), nn.Linear(4, 3)
    theirs = copy.deepcopy(ma)
    ours.update_moving_average(ours.EMA(0.9), ma, online)
    bp.update_moving_average(bp.EMA(0.9), theirs, online)
    for a, b in zip(ma.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)

    class Half:  # a custom updater: applied tensor by tensor
        def update_average(self, old, new):
            return (old + new) / 2

    before = [p.clone() for p in ma.parameters()]
    ours.update_moving_average(Half(), ma, online)
    for a, b, o in zip(ma.parameters(), before, online.parameters()):
        torch.testing.assert_close(a, (b + o) / 2)
    with pytest.raises(RuntimeError, match="same structure"):
        ours.update_moving_average(ours.EMA(0.9), nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)))


def test_random_apply_draws_like_byol_pytorch_and_validates():
    double = lambda t: t * 2  # noqa: E731
    x = torch.ones(2, 1)
    random.seed(3)
    mine = [ours.RandomApply(double, 0.5)(x).sum().item() for _ in range(20)]
    random.seed(3)
    theirs = [bp.RandomApply(double, 0.5)(x).sum().item() for _ in range(20)]
    assert mine == theirs and len(set(mine)) == 2
    with pytest.raises(ValueError, match="p must be"):
        ours.RandomApply(double, 1.5)
    with pytest.raises(TypeError, match="fn must be callable"):
        ours.RandomApply(3, 0.5)


def test_heads_have_byol_pytorch_keys_and_shapes():
    for name in ("MLP", "SimSiamMLP"):
        mine, theirs = getattr(ours, name)(12, 8, 16), getattr(bp, name)(12, 8, 16)
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
        mine.load_state_dict(theirs.state_dict())
        x = torch.randn(4, 12)
        torch.testing.assert_close(mine.eval()(x), theirs.eval()(x))


# ---------------------------------------------------------------------------------------------- SEM
def test_sem_matches_byol_pytorch_and_rejects_bad_sizes():
    x = torch.randn(3, 32)
    out = ours.SEM(32, temperature=0.5, dim_simplex=8)(x)
    torch.testing.assert_close(out, bp.SEM(32, temperature=0.5, dim_simplex=8)(x))
    torch.testing.assert_close(out.view(3, 4, 8).sum(-1), torch.ones(3, 4))  # each group a probability vector
    with pytest.raises(ValueError, match="divisible"):
        ours.SEM(30, dim_simplex=8)
    with pytest.raises(ValueError, match="temperature"):
        ours.SEM(32, temperature=0.0)
    with pytest.raises(ValueError, match="sem_num_simplices"):
        BYOL(tiny_net(), 8, use_simplicial_embeddings=True, sem_num_simplices=0)


def test_default_is_plain_byol_and_sem_keywords_build_byol_pytorch_09_projector():
    plain = BYOL(tiny_net(), 8, projection_size=8, projection_hidden_size=16)
    assert not any(isinstance(m, ours.SEM) for m in plain.modules())
    learner = BYOL(tiny_net(), 8, projection_size=8, projection_hidden_size=16, use_simplicial_embeddings=True,
                   sem_num_simplices=4, sem_simplex_dim=4, sem_temperature=0.2)
    theirs = byol_pytorch_learner(tiny_net(), image_size=8, projection_size=8, projection_hidden_size=16,
                                  sem_num_simplices=4, sem_simplex_dim=4, sem_temperature=0.2)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(learner.online_encoder.projector) == shapes(theirs.online_encoder.projector)
    sem = [m for m in learner.target_encoder.modules() if isinstance(m, ours.SEM)]
    assert len(sem) == 1 and sem[0].dim == 16 and sem[0].temperature == 0.2
    train_briefly(learner, 8)  # trains, and the target follows
    learner.eval()
    projection, _ = learner(torch.rand(2, 3, 8, 8), return_embedding=True)
    assert projection.shape == (2, 8) and torch.isfinite(projection).all()


# ---------------------------------------------------------------------------------------------- state dicts
def _assert_same_outputs(learner: BYOL, theirs: nn.Module, x: torch.Tensor, rtol=1e-5, atol=1e-5) -> None:
    learner.eval()
    theirs.eval()
    with torch.no_grad():
        mine_p, mine_e = learner(x, return_embedding=True)
        their_p, their_e = theirs(x, return_embedding=True)
        torch.testing.assert_close(mine_e, their_e, rtol=rtol, atol=atol)
        torch.testing.assert_close(mine_p, their_p, rtol=rtol, atol=atol)
        # and the targets are the loaded ones
        torch.testing.assert_close(learner.target_encoder(x)[0], theirs.target_encoder(x)[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize("sem", [True, False], ids=["0.9.1-default-sem", "0.9.1-no-sem"])
def test_state_dict_from_byol_pytorch_091_loads_and_computes_the_same(sem):
    theirs = byol_pytorch_learner(tiny_net(), use_simplicial_embeddings=sem, **CONFIG)
    train_briefly(theirs, 8)
    state = theirs.state_dict()
    assert any(k.startswith("net.") for k in state)  # the duplicated keys are there
    learner = BYOL(tiny_net(), use_simplicial_embeddings=sem, normalize_embedding_input=False, **CONFIG)
    learner.update_moving_average()
    with pytest.warns(UserWarning, match="schedule step starts at 0"):
        learner.load_state_dict(state)
    assert learner.step == 0
    _assert_same_outputs(learner, theirs, torch.rand(3, 3, 8, 8))


def test_state_dict_from_byol_pytorch_082_fixture_loads_and_computes_the_same():
    fixture = torch.load(FIXTURES / "byol_pytorch_0.8.2_state.pt", weights_only=True)
    learner = BYOL(tiny_net(), normalize_embedding_input=False, **CONFIG)
    with pytest.warns(UserWarning, match="schedule step starts at 0"):
        learner.load_state_dict(fixture["state_dict"])
    learner.eval()
    with torch.no_grad():
        projection, embedding = learner(fixture["input"], return_embedding=True)
    torch.testing.assert_close(embedding, fixture["embedding"])
    torch.testing.assert_close(projection, fixture["projection"])
    online, target = learner.online_encoder.state_dict(), learner.target_encoder.state_dict()
    for key, value in online.items():  # the target is byol-pytorch's target, not a copy of the online encoder
        torch.testing.assert_close(target[key], fixture["state_dict"]["target_encoder." + key])
    assert any(not torch.equal(online[k], target[k]) for k in online if online[k].is_floating_point())


def test_byol_pytorch_state_dict_loads_when_the_learner_is_a_submodule():
    theirs = byol_pytorch_learner(tiny_net(), use_simplicial_embeddings=False, **CONFIG)
    wrapped = {"model.learner." + k: v for k, v in theirs.state_dict().items()}
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.learner = BYOL(tiny_net(), normalize_embedding_input=False, **CONFIG)
    with pytest.warns(UserWarning, match="schedule step"):
        holder.load_state_dict(wrapped)
    _assert_same_outputs(holder.model.learner, theirs, torch.rand(2, 3, 8, 8))


def test_byol_pytorch_state_without_target_after_reset_starts_target_from_online():
    theirs = byol_pytorch_learner(tiny_net(), use_simplicial_embeddings=False, **CONFIG)
    theirs.reset_moving_average()  # byol-pytorch drops its target
    state = theirs.state_dict()
    assert not any(k.startswith("target_encoder.") for k in state)
    learner = BYOL(tiny_net(), **CONFIG)
    with pytest.warns(UserWarning) as record:
        learner.load_state_dict(state)
    assert any("copy of the loaded online encoder" in str(w.message) for w in record)
    for a, b in zip(learner.online_encoder.state_dict().values(), learner.target_encoder.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_own_state_dict_restores_the_schedule_and_old_ones_without_extra_state_warn():
    learner = BYOL(tiny_net(), total_steps=10, **CONFIG)
    for _ in range(3):
        learner.update_moving_average()
    fresh = BYOL(tiny_net(), total_steps=10, **CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(learner.state_dict())
    assert fresh.step == 3 and fresh.tau == learner.tau
    old = {k: v for k, v in learner.state_dict().items() if k != "_extra_state"}
    with pytest.warns(UserWarning, match="schedule step starts at 0"):
        fresh.load_state_dict(old)
    assert fresh.step == 0


def test_wrong_checkpoints_fail_naming_the_keys_and_the_fix():
    theirs = byol_pytorch_learner(tiny_net(), **CONFIG)  # 0.9.1's default: simplicial embeddings
    plain = BYOL(tiny_net(), **CONFIG)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError) as e:
        plain.load_state_dict(theirs.state_dict())
    msg = str(e.value)
    assert "use_simplicial_embeddings=True, sem_num_simplices=32, sem_simplex_dim=8" in msg
    assert "online_encoder.projector.0.0.weight" in msg and "online_encoder.projector.3.weight" in msg

    sem = BYOL(tiny_net(), use_simplicial_embeddings=True, **CONFIG)
    with pytest.raises(RuntimeError, match="use_simplicial_embeddings=False"):
        sem.load_state_dict(BYOL(tiny_net(), **CONFIG).state_dict())

    other = {**CONFIG, "projection_size": 4}
    with pytest.raises(RuntimeError, match=r"size mismatch for online_predictor\.3\.weight"):
        plain.load_state_dict(BYOL(tiny_net(), **other).state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key.*online_encoder.net.extra"):
        bigger = BYOL(tiny_net(), **CONFIG).state_dict()
        bigger["online_encoder.net.extra.weight"] = torch.zeros(1)
        plain.load_state_dict(bigger)


def test_flattened_checkpoint_into_pooled_learner_names_token_pool_flatten():
    theirs = byol_pytorch_learner(small_cnn(), image_size=8, hidden_layer="layer4", projection_size=8,
                                  projection_hidden_size=16, use_simplicial_embeddings=False)
    pooled = BYOL(small_cnn(), 8, hidden_layer="layer4", projection_size=8, projection_hidden_size=16)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="token_pool='flatten'"):
        pooled.load_state_dict(theirs.state_dict())
    flat = BYOL(small_cnn(), 8, hidden_layer="layer4", projection_size=8, projection_hidden_size=16,
                token_pool="flatten", normalize_embedding_input=False)
    with pytest.warns(UserWarning, match="schedule step"):
        flat.load_state_dict(theirs.state_dict())
    _assert_same_outputs(flat, theirs, torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- attributes
def test_target_ema_updater_beta_reads_and_sets_tau():
    learner = BYOL(tiny_net(), moving_average_decay=0.9, **CONFIG)
    assert learner.target_ema_updater.beta == 0.9
    learner.target_ema_updater.beta = 0.5  # a user schedule, set every step in byol-pytorch code
    assert learner.tau == 0.5
    before = [p.clone() for p in learner.target_encoder.parameters()]
    with torch.no_grad():
        for p in learner.online_encoder.parameters():
            p.add_(1.0)
    learner.update_moving_average()
    for t, b, o in zip(learner.target_encoder.parameters(), before, learner.online_encoder.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * o)
    scheduled = BYOL(tiny_net(), total_steps=10, **CONFIG)
    assert scheduled.target_ema_updater.beta == scheduled.tau
    with pytest.warns(UserWarning, match="turns off the cosine tau schedule"):
        scheduled.target_ema_updater.beta = 0.7
    assert scheduled.total_steps is None and scheduled.tau == 0.7
    with pytest.raises(ValueError, match="beta must be a float in"):
        scheduled.target_ema_updater.beta = 2
    assert isinstance(learner.target_ema_updater, ours.EMA)
    learner.target_ema_updater = ours.EMA(0.8)  # assigning a new updater, as byol-pytorch code may
    assert learner.tau == 0.8
    ours.update_moving_average(learner.target_ema_updater, learner.target_encoder, learner.online_encoder)


def test_get_target_encoder():
    learner = BYOL(tiny_net(), **CONFIG)
    assert learner._get_target_encoder() is learner.target_encoder
    with pytest.raises(RuntimeError, match="use_momentum=False"):
        BYOL(tiny_net(), use_momentum=False, **CONFIG)._get_target_encoder()


@pytest.mark.parametrize("kwargs", [{}, {"use_simsiam_mlp": True}, {"use_simplicial_embeddings": True, "sem_num_simplices": 2}])
def test_net_wrapper_with_byol_pytorch_signature_and_attributes(kwargs):
    torch.manual_seed(0)
    net = small_cnn()
    mine = ours.NetWrapper(net, 8, 16, layer="avgpool", **kwargs)
    theirs = bp.NetWrapper(copy.deepcopy(net), 8, 16, layer="avgpool", **kwargs)
    assert mine.projection_size == 8 and mine.projection_hidden_size == 16 and mine.projector is None
    assert mine._find_layer() is net.avgpool and mine.hook_registered
    x = torch.rand(4, 3, 8, 8)
    projection, representation = mine(x)  # builds the projector on the first forward, as byol-pytorch does
    their_projection, their_representation = theirs(x)
    assert mine.hidden == {}  # read and emptied, as byol-pytorch's
    assert mine._get_projector(representation) is mine.projector
    keys = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert keys(mine) == keys(theirs)
    mine.load_state_dict(theirs.state_dict())
    mine.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(x)[0], theirs(x)[0])
    torch.testing.assert_close(representation, their_representation)


def test_net_wrapper_old_positional_projector_and_errors():
    proj = nn.Linear(16, 4)
    wrapper = ours.NetWrapper(small_cnn(), proj, layer="avgpool")
    assert wrapper.projector is proj and wrapper(torch.rand(2, 3, 8, 8))[0].shape == (2, 4)
    with pytest.raises(TypeError, match="pass layer= and token_pool= by keyword"):
        ours.NetWrapper(small_cnn(), proj, "avgpool")  # the old positional layer
    with pytest.raises(ValueError, match="projection_size must be a positive int"):
        ours.NetWrapper(small_cnn(), layer="avgpool")(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- behaviour
def test_return_embedding_normalization_difference_and_the_keyword_restoring_byol_pytorch():
    theirs = byol_pytorch_learner(small_cnn(), image_size=8, hidden_layer="avgpool", projection_size=8,
                                  projection_hidden_size=16, use_simplicial_embeddings=False)
    x = torch.rand(3, 3, 8, 8)
    for normalize, same in ((True, False), (False, True)):
        learner = BYOL(small_cnn(), 8, hidden_layer="avgpool", projection_size=8, projection_hidden_size=16,
                       normalize_embedding_input=normalize)
        with pytest.warns(UserWarning):
            learner.load_state_dict(theirs.state_dict())
        learner.eval()
        theirs.eval()
        with torch.no_grad():
            mine, their = learner(x, return_embedding=True)[1], theirs(x, return_embedding=True)[1]
        assert torch.allclose(mine, their, atol=1e-5) is same


def test_4d_hidden_output_pooled_here_flattened_with_token_pool_flatten():
    x = torch.rand(2, 3, 64, 64)
    resnet = torchvision.models.resnet18()
    pooled = BYOL(resnet, 64, hidden_layer="layer4", projection_hidden_size=32)
    assert pooled.hidden_dim == 512
    flat = BYOL(torchvision.models.resnet18(), 64, hidden_layer="layer4", projection_hidden_size=32, token_pool="flatten")
    assert flat.hidden_dim == 2048  # 512 x 2 x 2, byol-pytorch's size
    theirs = bp.NetWrapper(flat.net, 256, 32, layer="layer4")
    flat.eval()
    with torch.no_grad():
        torch.testing.assert_close(flat.online_encoder(x, return_projection=False), theirs(x, return_projection=False))


def test_images_outside_unit_range_warn_once_on_the_first_training_forward(monkeypatch):
    import byol_wrapper.byol as byol_module

    calls = []
    real = byol_module.warn_if_outside_unit_range
    monkeypatch.setattr(byol_module, "warn_if_outside_unit_range", lambda x: calls.append(1) or real(x))
    learner = BYOL(tiny_net(), **CONFIG)
    with pytest.warns(UserWarning, match=r"not in \[0, 1\].*drop its Normalize"):
        learner(torch.randn(4, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            learner(torch.randn(4, 3, 8, 8))  # checked once only: no host read again
    assert calls == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BYOL(tiny_net(), **CONFIG)(torch.rand(4, 3, 8, 8))  # in range
        BYOL(tiny_net(), **CONFIG)(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
        BYOL(tiny_net(), check_input_range=False, **CONFIG)(torch.randn(4, 3, 8, 8))
        BYOL(tiny_net(), augment_fn=nn.Identity(), **CONFIG)(torch.randn(4, 3, 8, 8))  # its own pipeline
        BYOL(tiny_net(), **CONFIG).eval()(torch.randn(2, 3, 8, 8), return_embedding=True)
    assert len(calls) == 3  # in range, uint8, and nothing for the others


# ---------------------------------------------------------------------------------------------- README snippets
def _readme_snippets() -> list[str]:
    readme = importlib.metadata.metadata("byol-pytorch").get_payload() or importlib.metadata.metadata("byol-pytorch")["Description"]
    return re.findall(r"```python\n(.*?)```", readme, flags=re.S)


def _shrink(code: str, **extra: str) -> str:
    """byol-pytorch's README code, on our package, at CPU size; every replacement must apply."""
    replacements = {
        "from byol_pytorch import": "from byol_wrapper import",
        "models.resnet50(pretrained=True)": "models.resnet18()",
        "models.resnet50(pretrained = True)": "models.resnet18()",
        "image_size = 256": "image_size = 32",
        "torch.randn(20, 3, 256, 256)": "torch.randn(4, 3, 32, 32)",
        "torch.randn(2, 3, 256, 256)": "torch.randn(2, 3, 32, 32)",
        "range(100)": "range(2)",
        "MockDataset(256, 10000)": "MockDataset(32, 8)",
        "num_train_steps = 100_000": "num_train_steps = 3",
        "batch_size = 16": "batch_size = 4",
        "checkpoint_every = 1000": "checkpoint_every = 2",
        **extra,
    }
    for old, new in replacements.items():
        code = code.replace(old, new)
    assert "byol_pytorch" not in code and "256, 256" not in code and "resnet50" not in code, code
    return code


def _run(code: str, tmp_path, monkeypatch) -> dict:
    import kornia

    monkeypatch.chdir(tmp_path)
    # The later README blocks continue the first one's imports (BYOL from the package).
    namespace = {"torch": torch, "nn": nn, "kornia": kornia, "BYOL": byol_wrapper.BYOL, "resnet": torchvision.models.resnet18()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.randn images: the range warning is tested above
        exec(compile(code, "byol-pytorch README", "exec"), namespace)  # noqa: S102 - byol-pytorch's own README
    return namespace


def test_readme_snippets_of_byol_pytorch_run_on_byol_wrapper(tmp_path, monkeypatch):
    snippets = _readme_snippets()
    assert len(snippets) == 7, "byol-pytorch's README changed: review this test"
    basic, simsiam, advanced, kornia_one, kornia_two, embedding, _trainer = snippets  # trainer: next test
    # 1. the basic loop: trains and saves the backbone
    ns = _run(_shrink(basic), tmp_path, monkeypatch)
    assert ns["learner"].step == 2 and (tmp_path / "improved-net.pt").exists()
    torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "improved-net.pt", weights_only=True))
    # 2. SimSiam
    ns = _run(_shrink(simsiam), tmp_path, monkeypatch)
    assert ns["learner"].target_encoder is None
    # 3. hyperparameters, kornia augment_fn, augment_fn2
    for snippet in (advanced, kornia_one, kornia_two):
        ns = _run(_shrink(snippet), tmp_path, monkeypatch)
        loss = ns["learner"](torch.rand(2, 3, 32, 32))
        loss.backward()
        assert torch.isfinite(loss)
    assert isinstance(ns["learner"].augment2, nn.Sequential)
    # 4. return_embedding
    ns = _run(_shrink(embedding), tmp_path, monkeypatch)
    assert ns["projection"].shape == (2, 256) and ns["embedding"].shape == (2, 512)


def test_readme_trainer_snippet_runs_with_mock_dataset(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    trainer_code = [s for s in _readme_snippets() if "BYOLTrainer(" in s]
    assert len(trainer_code) == 1
    ns = _run(_shrink(trainer_code[0]), tmp_path, monkeypatch)
    trainer = ns["trainer"]
    assert int(trainer.step) == 3 and trainer.learner.step == 3
    assert trainer.learner.total_steps == 3  # the cosine tau over num_train_steps
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["checkpoint.0.pt", "checkpoint.1.pt", "checkpoint.final.pt", "last.prev.pt", "last.pt"]
    torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "checkpoints" / "checkpoint.final.pt", weights_only=True))


def _trainer(tmp_path, steps=2, **kwargs):
    return byol_wrapper.BYOLTrainer(
        tiny_net(), dataset=byol_wrapper.MockDataset(8, 6), image_size=8, hidden_layer=-2, learning_rate=1e-3,
        num_train_steps=steps, batch_size=4, checkpoint_every=1, checkpoint_folder=str(tmp_path / "ck"),
        byol_kwargs={"projection_size": 8, "projection_hidden_size": 16}, **kwargs,
    )


def test_trainer_never_saves_a_diverged_state_over_its_checkpoint(tmp_path):
    pytest.importorskip("accelerate")
    trainer = _trainer(tmp_path, steps=2)
    trainer()
    good = (tmp_path / "ck" / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.learner.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN or infinite by step 3"):
        trainer.save(3)
    assert (tmp_path / "ck" / "last.pt").read_bytes() == good
    assert not (tmp_path / "ck" / "checkpoint.2.pt").exists()


def test_trainer_refuses_a_busy_folder_and_resumes_from_its_full_checkpoint(tmp_path):
    pytest.importorskip("accelerate")
    from byol_wrapper.lock import RunLock

    first = _trainer(tmp_path, steps=2)
    busy = RunLock(tmp_path / "ck").acquire()  # another trainer (or byol-train) training into the same folder
    with pytest.raises(RuntimeError, match="another process is training into checkpoint_folder"):
        first()
    assert int(first.step) == 0 and not (tmp_path / "ck" / "last.pt").exists()
    busy.release()
    first()
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["learner"]["_extra_state"]["step"] == 2
    online = {k: v.clone() for k, v in first.learner.state_dict().items() if k != "_extra_state"}
    resumed = _trainer(tmp_path, steps=4, resume=True)
    assert int(resumed.step) == 2 and resumed.learner.step == 2
    for k, v in resumed.learner.state_dict().items():
        if k != "_extra_state":
            torch.testing.assert_close(v, online[k])
    assert resumed.optimizer.state_dict()["state"]  # Adam moments restored
    resumed()
    assert resumed.learner.step == 4 and torch.load(tmp_path / "ck" / "last.pt", weights_only=True)["step"] == 4


def test_trainer_errors_and_mock_dataset(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    with pytest.raises(ValueError, match="num_train_steps must be a positive int"):
        _trainer(tmp_path, steps=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        byol_wrapper.BYOLTrainer(tiny_net(), dataset=byol_wrapper.MockDataset(8, 1), image_size=8, hidden_layer=-2,
                                 learning_rate=1e-3, num_train_steps=1, checkpoint_folder=str(tmp_path / "x"))
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r"byol-wrapper\[integrations\]"):
        _trainer(tmp_path)
    data = byol_wrapper.MockDataset(8, 4)
    assert len(data) == 4 and data[1].shape == (3, 8, 8) and torch.equal(data[1], data[1])
    assert 0 <= data[0].min() and data[0].max() <= 1  # the range the built-in views assume
    with pytest.raises(IndexError):
        data[4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_range_check_reads_once_then_training_steps_have_no_host_sync():
    learner = BYOL(small_cnn().cuda(), 16, hidden_layer="avgpool", projection_size=8, projection_hidden_size=16)
    x = torch.rand(8, 3, 16, 16, device="cuda")
    learner(x).backward()  # the first training forward: the one host read of the range check
    learner.update_moving_average()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            learner(x).backward()
            learner.update_moving_average()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not learner._range_check_pending
