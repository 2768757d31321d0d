"""The BYOL learner: construction without side effects, training, target/EMA, errors, state."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from byol_wrapper import BYOL
from byol_wrapper.extractor import _FeatureHook

from .conftest import SMALL_HEADS, TinyCNN


def _snapshot(net: nn.Module) -> tuple[dict, dict]:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {name: m.training for name, m in net.named_modules()}
    return state, flags


def _assert_unchanged(net: nn.Module, snap: tuple[dict, dict]) -> None:
    state, flags = snap
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert {name: m.training for name, m in net.named_modules()} == flags


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_constructor_has_no_side_effects(resnet18, mode):
    if mode == "eval":
        resnet18.eval()
    elif mode == "mixed":
        resnet18.layer2.eval()
    snap = _snapshot(resnet18)
    learner = BYOL(resnet18, image_size=32, hidden_layer="avgpool", **SMALL_HEADS)
    _assert_unchanged(resnet18, snap)
    assert learner.hidden_dim == 512
    assert learner.online_encoder.projector[0].in_features == 512
    assert learner.net is resnet18


class NotMetaFriendly(TinyCNN):
    """Forward needs real data (.item()), so the meta-device probe fails and the guarded fallback runs."""

    def forward(self, x):
        if x.sum().item() < -1:
            raise AssertionError
        return super().forward(x)


def test_fallback_probe_restores_buffers_and_flags():
    net = NotMetaFriendly()
    net.features[1].momentum = None  # cumulative average: would move at any batch
    snap = _snapshot(net)
    learner = BYOL(net, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    _assert_unchanged(net, snap)
    assert learner.hidden_dim == 16


def test_explicit_hidden_dim_skips_probing():
    class Exploding(TinyCNN):
        def forward(self, x):
            raise RuntimeError("must not be called by the constructor")

    learner = BYOL(Exploding(), image_size=8, hidden_layer="pool", hidden_dim=16, **SMALL_HEADS)
    assert learner.online_encoder.projector[0].in_features == 16


def test_heads_sized_from_hidden_layer_and_seen_by_optimizer(resnet18, tiny_vit):
    learner = BYOL(resnet18, image_size=32, hidden_layer="layer3", **SMALL_HEADS)
    assert learner.hidden_dim == 256
    params = {id(p) for p in learner.parameters()}
    for module in (learner.online_encoder.projector, learner.online_predictor):
        assert all(id(p) in params for p in module.parameters())
    assert BYOL(tiny_vit, image_size=32, hidden_layer="encoder", **SMALL_HEADS).hidden_dim == 32
    assert BYOL(TinyCNN(), image_size=8, hidden_layer=-1, **SMALL_HEADS).hidden_dim == 5


def test_default_heads_follow_the_paper(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool")
    proj = learner.online_encoder.projector
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert proj[0].out_features == 4096 and proj[3].out_features == 256
    assert learner.online_predictor[0].in_features == 256


def test_target_is_frozen_copy_with_same_names(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    online = dict(learner.online_encoder.named_parameters())
    target = dict(learner.target_encoder.named_parameters())
    assert online.keys() == target.keys()
    for name, p in target.items():
        assert not p.requires_grad
        assert torch.equal(p, online[name]) and p.data_ptr() != online[name].data_ptr()


# ---------------------------------------------------------------- training
def test_training_step_updates_online_only_and_ema_follows(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", moving_average_decay=0.5, **SMALL_HEADS)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    images = torch.rand(6, 3, 10, 10)
    target_before = copy.deepcopy(learner.target_encoder)
    loss = learner(images)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and 0 <= loss.item() <= 8
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in learner.target_encoder.parameters())
    assert learner.online_predictor[0].weight.grad is not None
    assert learner.net.features[0].weight.grad is not None
    opt.step()
    learner.update_moving_average()
    assert learner.step == 1
    for (name, pt), p0, po in zip(
        learner.target_encoder.named_parameters(), target_before.parameters(), learner.online_encoder.parameters()
    ):
        torch.testing.assert_close(pt, 0.5 * p0 + 0.5 * po, msg=name)


def test_loss_decreases_on_a_fixed_batch(tiny_cnn):
    torch.manual_seed(0)
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", augment_fn=lambda x: x, **SMALL_HEADS)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    images = torch.rand(16, 3, 8, 8)
    losses = []
    for _ in range(15):
        loss = learner(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tau_schedule_through_learner(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", moving_average_decay=0.996, total_steps=4, **SMALL_HEADS)
    taus = []
    for _ in range(5):
        taus.append(learner.tau)
        learner.update_moving_average()
    assert taus[0] == pytest.approx(0.996) and taus[2] == pytest.approx(0.998) and taus[4] == pytest.approx(1.0)
    constant = BYOL(TinyCNN(), image_size=8, hidden_layer="pool", **SMALL_HEADS)
    constant.update_moving_average()
    assert constant.tau == 0.99


def _count_calls(net: nn.Module) -> list[int]:
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize(
    "kwargs, expected",
    [({}, [4, 4, 4, 4]), ({"concat_views": True}, [8, 8]), ({"use_momentum": False}, [4, 4])],
)
def test_backbone_passes_and_per_view_batchnorm(tiny_cnn, kwargs, expected):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS, **kwargs)
    sizes = _count_calls(tiny_cnn.features)  # the target's deep copy is not counted: it has no such hook
    target_sizes = _count_calls(learner.target_encoder.net.features) if learner.target_encoder is not None else []
    learner(torch.rand(4, 3, 8, 8))
    assert sizes + target_sizes == expected


def test_simsiam_variant(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", use_momentum=False, **SMALL_HEADS)
    assert learner.target_encoder is None
    learner(torch.rand(4, 3, 8, 8)).backward()
    with pytest.raises(RuntimeError, match="use_momentum=False"):
        learner.update_moving_average()


@pytest.mark.parametrize("policy", ["ema", "copy", "none"])
def test_buffer_policy_in_learner(tiny_cnn, policy):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", buffer_policy=policy, moving_average_decay=0.0, **SMALL_HEADS)
    target_bn = learner.target_encoder.net.features[1]
    before = target_bn.running_mean.clone()
    learner(torch.rand(4, 3, 8, 8))
    online_bn = learner.net.features[1]
    if policy == "none":
        assert not torch.equal(target_bn.running_mean, before)  # target keeps statistics of its own passes
    else:
        assert torch.equal(target_bn.running_mean, before)  # its own passes leave them alone
        learner.update_moving_average()  # tau = 0: buffers equal online's
        torch.testing.assert_close(target_bn.running_mean, online_bn.running_mean)
        assert int(target_bn.num_batches_tracked) == int(online_bn.num_batches_tracked)


def test_reset_moving_average(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    with torch.no_grad():
        for p in learner.online_encoder.parameters():
            p.add_(1.0)
    learner.update_moving_average()
    learner.reset_moving_average()
    for a, b in zip(learner.target_encoder.state_dict().values(), learner.online_encoder.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert learner.step == 1


# ---------------------------------------------------------------- inputs
def test_embedding_outputs_and_single_image_in_eval(resnet18):
    learner = BYOL(resnet18, image_size=32, hidden_layer="avgpool", **SMALL_HEADS)
    projection, embedding = learner(torch.rand(3, 3, 32, 32), return_embedding=True)
    assert projection.shape == (3, 16) and embedding.shape == (3, 512)
    learner.eval()
    embedding = learner(torch.rand(1, 3, 32, 32), return_embedding=True, return_projection=False)
    assert embedding.shape == (1, 512)


def test_uint8_nonsquare_and_any_input_size(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=(8, 12), hidden_layer="pool", **SMALL_HEADS)
    images = torch.randint(0, 256, (4, 3, 20, 16), dtype=torch.uint8)
    assert torch.isfinite(learner(images))
    float_emb = learner(images.float() / 255, return_embedding=True, return_projection=False)
    uint8_emb = learner(images, return_embedding=True, return_projection=False)
    torch.testing.assert_close(float_emb, uint8_emb)


def test_single_channel_backbone():
    net = TinyCNN(channels=1)
    learner = BYOL(net, image_size=8, hidden_layer="pool", mean=(0.5,), std=(0.25,), **SMALL_HEADS)
    assert learner.channels == 1
    assert torch.isfinite(learner(torch.rand(4, 1, 8, 8)))


def test_custom_augment_fns_replace_views(tiny_cnn):
    calls: list[str] = []

    def aug(x):
        calls.append("a")
        return x.flip(-1)

    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", augment_fn=aug, **SMALL_HEADS)
    learner(torch.rand(4, 3, 8, 8))
    assert calls == ["a", "a"]  # augment_fn2 defaults to augment_fn
    with pytest.raises(TypeError, match="augment_fn2 must be callable"):
        BYOL(TinyCNN(), image_size=8, hidden_layer="pool", augment_fn2=3, **SMALL_HEADS)


def test_vit_backbone_trains(tiny_vit):
    learner = BYOL(tiny_vit, image_size=32, hidden_layer="encoder", token_pool="mean", **SMALL_HEADS)
    learner(torch.rand(2, 3, 32, 32)).backward()
    assert tiny_vit.conv_proj.weight.grad is not None


def test_bf16_autocast_loss_is_float32(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = learner(torch.rand(4, 3, 8, 8))
    assert loss.dtype == torch.float32
    loss.backward()


# ---------------------------------------------------------------- errors
def test_input_errors(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    with pytest.raises(ValueError, match="at least 2 images"):
        learner(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*unsqueeze"):
        learner(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="3 channels.*permute"):
        learner(torch.rand(2, 8, 8, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        learner([[0.0]])
    with pytest.raises(TypeError):
        learner(torch.ones(2, 3, 8, 8, dtype=torch.int32))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"hidden_layer": "nope"}, ValueError, "hidden_layer='nope'"),
        ({"hidden_layer": "unused"}, RuntimeError, "never ran"),
        ({"moving_average_decay": 1.5}, ValueError, "moving_average_decay"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"buffer_policy": "avg"}, ValueError, "buffer_policy"),
        ({"image_size": "big"}, TypeError, "image_size"),
        ({"image_size": 0}, ValueError, "image_size"),
        ({"hidden_dim": -3}, ValueError, "hidden_dim"),
        ({"projection_size": 0}, ValueError, "projection_size"),
    ],
)
def test_constructor_errors(tiny_cnn, kwargs, exc, match):
    args = {"image_size": 8, "hidden_layer": "pool", **SMALL_HEADS, **kwargs}
    with pytest.raises(exc, match=match):
        BYOL(tiny_cnn, **args)


def test_net_must_be_a_module():
    with pytest.raises(TypeError, match="net must be"):
        BYOL(lambda x: x, image_size=8)


# ---------------------------------------------------------------- hooks & state
def test_hooks_removable_and_learner_recreatable(tiny_cnn):
    def hooks() -> int:
        return sum(isinstance(h, _FeatureHook) for m in tiny_cnn.modules() for h in m._forward_hooks.values())

    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    assert hooks() == 1
    learner.remove_hooks()
    assert hooks() == 0
    del learner
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    del learner
    gc.collect()
    assert hooks() == 0
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", **SMALL_HEADS)
    assert torch.isfinite(learner(torch.rand(2, 3, 8, 8)))


def test_state_dict_round_trip_into_fresh_learner(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", total_steps=10, **SMALL_HEADS)
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    for _ in range(3):
        loss = learner(torch.rand(4, 3, 8, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
    state = learner.state_dict()

    fresh = BYOL(TinyCNN(), image_size=8, hidden_layer="pool", total_steps=10, **SMALL_HEADS)
    fresh.load_state_dict(state)
    assert fresh.step == 3 and fresh.tau == learner.tau
    learner.eval()
    fresh.eval()
    x = torch.rand(3, 3, 8, 8)
    for a, b in zip(learner(x, return_embedding=True), fresh(x, return_embedding=True)):
        assert torch.equal(a, b)
    assert torch.equal(learner.target_encoder(x)[0], fresh.target_encoder(x)[0])


def test_to_and_casts_work_and_ema_follows_replaced_tensors(tiny_cnn):
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", moving_average_decay=0.0, **SMALL_HEADS)
    learner.update_moving_average()  # builds the cached EMA plan
    learner.to("cpu").double().float()  # the casts replace every buffer tensor
    assert learner.augment1._mean_t.dtype == torch.float32
    learner(torch.rand(4, 3, 8, 8))  # moves the online BatchNorm statistics
    with torch.no_grad():
        for p in learner.online_encoder.parameters():
            p.add_(1.0)
    learner.update_moving_average()  # tau = 0: the target must equal the online network, buffers included
    for (name, a), b in zip(learner.target_encoder.state_dict().items(), learner.online_encoder.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_subclass_augment_is_used_by_forward(tiny_cnn) -> None:
    """A learner subclass overriding ``augment`` (a user's own views) is used by the training forward."""
    from byol_wrapper import BYOL

    calls = []

    class Mine(BYOL):
        def augment(self, x):
            calls.append(x.shape)
            return x, x.flip(-1)

    learner = Mine(tiny_cnn, image_size=8, hidden_layer="pool", projection_size=8, projection_hidden_size=16)
    learner(torch.rand(4, 3, 8, 8)).backward()
    assert calls == [torch.Size([4, 3, 8, 8])]
