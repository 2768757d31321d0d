"""Hidden-layer extraction: names, indices, output, pooling, hooks and their removal."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from byol_wrapper.extractor import HiddenLayerExtractor, pool_features, resolve_layer
from byol_wrapper.extractor import _FeatureHook


def _feature_hooks(net: nn.Module) -> int:
    return sum(isinstance(h, _FeatureHook) for m in net.modules() for h in m._forward_hooks.values())


def test_layer_by_deep_name(resnet18):
    ext = HiddenLayerExtractor(resnet18, "layer4.1.conv2")
    assert ext(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    ext = HiddenLayerExtractor(resnet18, "layer3")
    assert ext(torch.rand(2, 3, 32, 32)).shape == (2, 256)


def test_layer_by_index_and_output(resnet18):
    assert resolve_layer(resnet18, -2) is resnet18.avgpool
    assert resolve_layer(resnet18, 0) is resnet18.conv1
    assert resolve_layer(resnet18, -1) is None
    out = HiddenLayerExtractor(resnet18, -1)(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_unknown_name_lists_closest(resnet18):
    with pytest.raises(ValueError, match="hidden_layer='avgpol'.*'avgpool'"):
        HiddenLayerExtractor(resnet18, "avgpol")
    with pytest.raises(ValueError, match="'layer4.1.conv2'"):
        HiddenLayerExtractor(resnet18, "layer4.1.conv9")


def test_index_out_of_range_and_bad_type(resnet18):
    with pytest.raises(ValueError, match="out of range.*10 top-level children"):
        HiddenLayerExtractor(resnet18, 42)
    with pytest.raises(TypeError, match="hidden_layer must be"):
        HiddenLayerExtractor(resnet18, 1.5)
    with pytest.raises(TypeError):
        HiddenLayerExtractor(resnet18, True)


def test_layer_that_never_fires(tiny_cnn):
    ext = HiddenLayerExtractor(tiny_cnn, "unused")
    with pytest.raises(RuntimeError, match="never ran"):
        ext(torch.rand(2, 3, 8, 8))


def test_pooling_rules():
    x4 = torch.rand(2, 5, 3, 4)
    torch.testing.assert_close(pool_features(x4), x4.mean(dim=(2, 3)))
    x3 = torch.rand(2, 7, 6)
    torch.testing.assert_close(pool_features(x3, "cls"), x3[:, 0])
    torch.testing.assert_close(pool_features(x3, "mean"), x3.mean(1))
    x2 = torch.rand(2, 6)
    assert pool_features(x2) is x2
    torch.testing.assert_close(pool_features((x3, None), "mean"), x3.mean(1))
    with pytest.raises(RuntimeError, match="1-D"):
        pool_features(torch.rand(4))


def test_vit_token_pooling(tiny_vit):
    x = torch.rand(2, 3, 32, 32)
    cls = HiddenLayerExtractor(tiny_vit, "encoder", token_pool="cls")(x)
    mean = HiddenLayerExtractor(tiny_vit, "encoder", token_pool="mean")(x)
    assert cls.shape == mean.shape == (2, 32)
    assert not torch.allclose(cls, mean)
    with pytest.raises(ValueError, match="token_pool"):
        HiddenLayerExtractor(tiny_vit, "encoder", token_pool="max")


def test_hook_handle_removable_and_no_stale_hooks(tiny_cnn):
    ext = HiddenLayerExtractor(tiny_cnn, "pool")
    assert _feature_hooks(tiny_cnn) == 1
    ext.remove_hook()
    ext.remove_hook()  # idempotent
    assert _feature_hooks(tiny_cnn) == 0
    with pytest.raises(RuntimeError, match="removed"):
        ext(torch.rand(2, 3, 8, 8))
    # A dropped extractor takes its hook with it; re-creating on the same backbone works.
    ext = HiddenLayerExtractor(tiny_cnn, "pool")
    del ext
    gc.collect()
    assert _feature_hooks(tiny_cnn) == 0
    ext = HiddenLayerExtractor(tiny_cnn, "pool")
    assert ext(torch.rand(2, 3, 8, 8)).shape == (2, 16)
    assert _feature_hooks(tiny_cnn) == 1


def test_deepcopy_gets_its_own_hook(tiny_cnn):
    ext = HiddenLayerExtractor(tiny_cnn, "pool")
    twin = copy.deepcopy(ext)
    assert _feature_hooks(tiny_cnn) == 1 and _feature_hooks(twin.net) == 1
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(ext(x), twin(x))
    twin.remove_hook()
    assert _feature_hooks(tiny_cnn) == 1
    assert ext(x).shape == (2, 16)


# ---------------------------------------------------------------------------------------------- the probe
class _SeesDevices(nn.Module):
    """TinyCNN-like backbone recording the device of every input; ``meta=False`` reads a value (no meta support)."""

    def __init__(self, meta: bool = True) -> None:
        super().__init__()
        self.meta = meta
        self.seen: list[str] = []
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.unused = nn.Linear(2, 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device.type)
        if not self.meta and bool(x.sum() > 1e9):
            x = x * 2
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


AFTER_POOL = ("unused.weight", "unused.bias", "fc.weight", "fc.bias")


@pytest.mark.parametrize("meta", [True, False])
def test_probe_size_and_unreachable_parameters_change_nothing(meta):
    from byol_wrapper.extractor import RepresentationProbe, probe_representation

    net = _SeesDevices(meta).train()
    bn = net.features[1]  # a real train-mode batch would move its statistics and num_batches_tracked
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ext = HiddenLayerExtractor(net, "pool")
    assert probe_representation(ext, (3, 8, 8)) == RepresentationProbe(4, ())
    found = probe_representation(ext, (3, 8, 8), gradients=True)
    assert found.dim == 4 and found.unreachable == AFTER_POOL
    # The meta trace runs alone when the backbone supports it; otherwise one real pass follows it, on the CPU.
    assert net.seen == (["meta"] * 2 if meta else ["meta", "cpu"] * 2)
    assert net.training and bn.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    # Frozen layers are not reported; the output layer reaches fc.
    net.unused.requires_grad_(False)
    assert probe_representation(HiddenLayerExtractor(net, -1), (3, 8, 8), gradients=True).unreachable == ()


def test_probe_input_dtype_follows_the_backbone():
    from byol_wrapper.extractor import probe_representation

    net = _SeesDevices(meta=False).double()
    assert probe_representation(HiddenLayerExtractor(net, "pool"), (3, 8, 8)).dim == 4  # a float32 input would fail
    with pytest.raises(RuntimeError):
        probe_representation(HiddenLayerExtractor(net, "pool"), (3, 8, 8), dtype=torch.float32)


def test_probe_errors_of_the_real_pass_reach_the_caller():
    from byol_wrapper.extractor import probe_representation

    with pytest.raises(RuntimeError, match="channels|size"):
        probe_representation(HiddenLayerExtractor(_SeesDevices(meta=False), "pool"), (5, 8, 8))


def test_one_probe_in_the_package_and_byol_does_not_import_distributed():
    """The meta-device trace lives in extractor.py only; byol.py and distributed.py no longer import each other."""
    import ast
    import pathlib

    import byol_wrapper

    package = pathlib.Path(byol_wrapper.__file__).parent
    tracing, imports = [], {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        module = path.relative_to(package).with_suffix("").as_posix()
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found.add(("." * node.level) + (node.module or ""))
                if node.module == "torch.func" and any(a.name == "functional_call" for a in node.names):
                    tracing.append(module)
        imports[module] = found
    assert tracing == ["extractor"], tracing
    assert ".distributed" not in imports["byol"], imports["byol"]
    assert ".byol" in imports["distributed"]
