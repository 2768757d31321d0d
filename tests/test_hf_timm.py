"""Part B of issue 12: backbones whose output is not a tensor (transformers ModelOutput, dicts, tuples, namedtuples),
timm models, and ``byol-train --backbone hf:``. Models are built from tiny configurations: nothing is downloaded."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from byol_wrapper import BYOL
from byol_wrapper.extractor import pool_features, select_output
from byol_wrapper.train import build_backbone, main

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

HEADS = dict(projection_size=8, projection_hidden_size=16)


def _vit_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    return transformers.ViTConfig(**{**base, **kw})


def _dinov2_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8)
    return transformers.Dinov2Config(**{**base, **kw})


def _resnet_config(**kw):
    return transformers.ResNetConfig(**{**dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), **kw})


def _check_trains(learner: BYOL, channels: int = 3) -> None:
    before = {k: v.detach().clone() for k, v in learner.net.state_dict().items()}
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    loss = learner(torch.rand(2, channels, 32, 32))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    learner.update_moving_average()
    assert any(not torch.equal(before[k], v) for k, v in learner.net.state_dict().items())


# ------------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize(
    "name, kwargs, dim",
    [
        ("resnet18", {}, 512),
        ("convnext_atto", {}, 320),
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1), 192),
        ("resnet18", dict(in_chans=1), 512),
    ],
    ids=["resnet", "convnext", "vit", "resnet-in_chans1"],
)
def test_timm_models_with_num_classes_0_and_hidden_layer_minus_1(name: str, kwargs: dict, dim: int) -> None:
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    learner = BYOL(net, image_size=32, hidden_layer=-1, **HEADS)
    assert learner.hidden_dim == dim and learner.channels == kwargs.get("in_chans", 3)
    _check_trains(learner, learner.channels)


# ------------------------------------------------------------------------------------------ transformers


@pytest.mark.parametrize(
    "make",
    [lambda: transformers.ViTModel(_vit_config()), lambda: transformers.Dinov2Model(_dinov2_config()),
     lambda: transformers.ResNetModel(_resnet_config())],
    ids=["ViTModel", "Dinov2Model", "ResNetModel"],
)
def test_transformers_models_with_hidden_layer_minus_1_use_pooler_output(make) -> None:
    # Before issue 12: "RuntimeError: the hooked layer returned BaseModelOutputWithPooling, not a tensor".
    net = make()
    learner = BYOL(net, image_size=32, hidden_layer=-1, **HEADS)
    _check_trains(learner)
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(x).pooler_output.flatten(1)
        got = learner.online_encoder.get_representation(x)
    torch.testing.assert_close(got, expected)
    assert learner.hidden_dim == expected.shape[1]


@pytest.mark.parametrize(
    "make, layer, take",
    [
        # an encoder block returns a tensor or a tuple whose first element is the hidden states (B, T, D)
        (lambda: transformers.ViTModel(_vit_config()), "layers.1", lambda out, h: h[-1][:, 0]),
        (lambda: transformers.Dinov2Model(_dinov2_config()), "encoder", lambda out, h: h[-1][:, 0]),
        # ResNetModel's encoder returns a BaseModelOutputWithNoAttention: last_hidden_state, average-pooled
        (lambda: transformers.ResNetModel(_resnet_config()), "encoder", lambda out, h: h[-1].mean(dim=(2, 3))),
    ],
    ids=["ViTModel-block", "Dinov2Model-encoder", "ResNetModel-encoder"],
)
def test_transformers_models_with_a_named_layer(make, layer: str, take) -> None:
    net = make()
    assert layer in dict(net.named_modules())
    learner = BYOL(net, image_size=32, hidden_layer=layer, **HEADS)
    _check_trains(learner)
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x, output_hidden_states=True)
        expected = take(out, out.hidden_states)
        got = learner.online_encoder.get_representation(x)
    torch.testing.assert_close(got, expected)


def test_no_pooler_uses_last_hidden_state_with_token_pool_and_output_key_overrides() -> None:
    net = transformers.ViTModel(_vit_config(), add_pooling_layer=False).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        hidden = net(x).last_hidden_state
        for pool, expected in (("cls", hidden[:, 0]), ("mean", hidden.mean(dim=1))):
            learner = BYOL(net, image_size=32, hidden_layer=-1, token_pool=pool, **HEADS)
            torch.testing.assert_close(learner.online_encoder.get_representation(x), expected)
    pooled = transformers.ViTModel(_vit_config()).eval()
    learner = BYOL(pooled, image_size=32, hidden_layer=-1, output_key="last_hidden_state", token_pool="mean", **HEADS)
    with torch.no_grad():
        torch.testing.assert_close(learner.online_encoder.get_representation(x), pooled(x).last_hidden_state.mean(dim=1))
    with pytest.raises(ValueError, match=r"output_key='pooled'.*'last_hidden_state' \(tensor \(2, 17, 32\)\), 'pooler_output'"):
        BYOL(pooled, image_size=32, hidden_layer=-1, output_key="pooled", hidden_dim=32, **HEADS).online_encoder.get_representation(x)
    with pytest.raises(TypeError, match="output_key"):
        BYOL(pooled, image_size=32, hidden_layer=-1, output_key=1.5, **HEADS)


Pair = collections.namedtuple("Pair", ["logits", "features"])


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.kind = kind

    def forward(self, x):
        f = self.conv(x)
        pooled = f.mean(dim=(2, 3))
        if self.kind == "dict":
            return {"feature_map": f, "logits": pooled[:, :2]}
        if self.kind == "namedtuple":
            return Pair(pooled[:, :2], f)
        if self.kind == "tuple":
            return (f, pooled[:, :2])
        return {"meta": "no tensors"}


def test_dict_namedtuple_and_tuple_outputs_follow_the_rule_and_output_key() -> None:
    x = torch.rand(4, 3, 10, 10)
    f = _Returns("dict").conv
    for kind, first in (("dict", "feature_map"), ("namedtuple", "logits"), ("tuple", 0)):
        net = _Returns(kind)
        net.conv = f
        with torch.no_grad():
            full = f(x).mean(dim=(2, 3))
            # no pooler_output / last_hidden_state: the first tensor
            default = BYOL(net, image_size=8, hidden_layer=-1, **HEADS).online_encoder.get_representation(x)
            torch.testing.assert_close(default, full if first in ("feature_map", 0) else full[:, :2])
            key = {"dict": "logits", "namedtuple": "features", "tuple": 1}[kind]
            picked = BYOL(net, image_size=8, hidden_layer=-1, output_key=key, **HEADS).online_encoder.get_representation(x)
            torch.testing.assert_close(picked, full[:, :2] if kind != "namedtuple" else full)
    with pytest.raises(RuntimeError, match="no tensor entry.*'meta' \\(str\\)"):
        BYOL(_Returns("none"), image_size=8, hidden_layer=-1, hidden_dim=4, **HEADS).online_encoder.get_representation(x)
    with pytest.raises(ValueError, match="does not index the tuple of 2 elements"):
        select_output((torch.zeros(1), torch.zeros(1)), 5)
    # evaluation's feature pooling follows the same rule
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=torch.rand(2, 5, 4), pooler_output=torch.rand(2, 4))
    torch.testing.assert_close(pool_features(out), out.pooler_output)


# ------------------------------------------------------------------------------------------ byol-train --backbone hf:


def _folder(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--image-size", "16", "--batch-size", "4",
        "--projection-size", "16", "--projection-hidden-size", "32", "--workers", "0", "--device", "cpu",
        "--no-progress", "--log-every", "1", "--optimizer", "adamw", "--lr", "1e-3", "--hidden-layer", "-1", *extra,
    ]


def test_cli_hf_backbone_from_a_local_folder(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data")
    model_dir = tmp_path / "tiny_vit"
    pretrained = transformers.ViTModel(_vit_config(image_size=16))
    pretrained.save_pretrained(model_dir)

    # default: the pretrained weights of the folder
    out = tmp_path / "pre"
    assert main([*_args(data, out, "--backbone", f"hf:{model_dir}"), "--max-steps", "1"]) == 0
    loaded = build_backbone(f"hf:{model_dir}")
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in loaded.state_dict().items())
    exported = torch.load(out / "backbone_ema.pt", weights_only=True)
    assert set(exported) == set(pretrained.state_dict())

    # --no-pretrained: random init from the config; --channels 1 sets num_channels
    random_init = build_backbone(f"hf:{model_dir}", pretrained=False)
    key = "embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(random_init.state_dict()[key], pretrained.state_dict()[key])
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 20), 4000 * i, np.uint16)).save(gray / f"{i}.png")
    out = tmp_path / "random"
    argv = _args(gray, out, "--backbone", f"hf:{model_dir}", "--no-pretrained", "--channels", "1")
    assert main([*argv, "--max-steps", "1"]) == 0
    assert main([*argv, "--max-steps", "2"]) == 0  # resumes
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state[key].shape[1] == 1
    assert json.loads((out / "config.json").read_text())["backbone"] == f"hf:{model_dir}"


def test_cli_hf_backbone_errors_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data")
    config_only = tmp_path / "config_only"
    _vit_config(image_size=16).save_pretrained(config_only)
    cases = [
        (["--backbone", f"hf:{config_only}"], "cannot load the pretrained weights.*--no-pretrained"),
        (["--backbone", f"hf:{tmp_path / 'missing'}"], "cannot read the configuration of hf:"),
        (["--backbone", "hf:"], "hf:MODEL_ID_OR_PATH"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*_args(data, tmp_path / "out", *extra), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert __import__("re").search(message, err), err
    # with --no-pretrained the config-only folder is enough
    assert main([*_args(data, tmp_path / "ok", "--backbone", f"hf:{config_only}", "--no-pretrained"), "--max-steps", "1"]) == 0
