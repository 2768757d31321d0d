"""Tests for byol_wrapper.evaluate against hand-computed cases (CPU, tiny)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from byol_wrapper.evaluate import (
    collapse_stats,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
)

# ---------------------------------------------------------------------------
# Helpers / fixtures
# ---------------------------------------------------------------------------


def _angle(deg: float) -> list[float]:
    rad = math.radians(deg)
    return [math.cos(rad), math.sin(rad)]


# Train set used by the hand-computed kNN cases (2-D, cosine similarity):
#   class 0 at 0 deg, class 1 at +60 and -60 deg.
# For the test point at 0 deg the similarities are 1.0 (class 0) and 0.5, 0.5
# (class 1), so with k=3 the class scores are
#   class 0: exp(1 / T)      class 1: 2 * exp(0.5 / T)
# Majority vote says class 1; the weighted vote says class 0 iff
# exp(0.5 / T) > 2, i.e. T < 0.5 / ln 2 = 0.7213.
TRAIN_X = torch.tensor([_angle(0), _angle(60), _angle(-60)])
TRAIN_Y = torch.tensor([0, 1, 1])


def _clusters(n_per_class: int = 10, num_classes: int = 3, dim: int = 8, seed: int = 0):
    """Well-separated clusters along distinct axes (separable by angle and linearly)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centers = torch.eye(dim)[:num_classes] * 3.0
    feats = centers[labels] + 0.1 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


class _PILDataset(Dataset):
    """Dataset yielding (PIL image, int label) pairs from uint8 HWC arrays."""

    def __init__(self, arrays: np.ndarray, labels: list[int]):
        self.arrays = arrays
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(self.arrays[i]), self.labels[i]


# ---------------------------------------------------------------------------
# knn_predict
# ---------------------------------------------------------------------------


def test_knn_weighting_beats_majority_vote():
    test = torch.tensor([_angle(0)])
    # Low temperature: weighted vote -> class 0 (majority would say 1).
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=3, temperature=0.1).tolist() == [0]
    # Just below / above the hand-computed crossover T* = 0.5 / ln 2 = 0.7213.
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=3, temperature=0.70).tolist() == [0]
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=3, temperature=0.75).tolist() == [1]
    # High temperature ~ majority vote -> class 1.
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=3, temperature=10.0).tolist() == [1]


def test_knn_k_larger_than_train_set_is_capped():
    test = torch.tensor([_angle(0)])
    for t, expected in [(0.1, 0), (10.0, 1)]:
        big = knn_predict(TRAIN_X, TRAIN_Y, test, k=1000, temperature=t)
        assert big.tolist() == [expected]
        assert torch.equal(big, knn_predict(TRAIN_X, TRAIN_Y, test, k=3, temperature=t))


def test_knn_hand_computed_small_k_and_scale_invariance():
    # Test point at +60 deg: sims = 0.5 (class 0), 1.0 (class 1 @ +60), -0.5 (class 1 @ -60).
    # k=1 -> class 1; test at 10 deg: nearest is class 0 (sim cos10 vs cos50).
    test = torch.tensor([_angle(60), _angle(10), _angle(-55)])
    preds = knn_predict(TRAIN_X, TRAIN_Y, test, k=1)
    assert preds.tolist() == [1, 0, 1]
    assert preds.dtype == torch.int64
    # Cosine similarity: rescaling features changes nothing.
    scaled = knn_predict(TRAIN_X * 7.0, TRAIN_Y, test * 0.01, k=1)
    assert torch.equal(preds, scaled)
    # k=2 at 0 deg: neighbours are class 0 (1.0) and one class-1 point (0.5) -> class 0
    # even at high temperature (1 vote each, larger weight wins).
    assert knn_predict(TRAIN_X, TRAIN_Y, torch.tensor([_angle(0)]), k=2, temperature=10.0).tolist() == [0]


def test_knn_matches_bruteforce_reference_with_chunking():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(40, 5, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    test = torch.randn(13, 5, generator=g)
    k, t = 7, 0.2
    expected = []
    tn = train / train.norm(dim=1, keepdim=True)
    for x in test:
        sims = tn @ (x / x.norm())
        top = sims.topk(k)
        scores = [0.0] * 4
        for s, i in zip(top.values.tolist(), top.indices.tolist()):
            scores[int(labels[i])] += math.exp(s / t)
        expected.append(max(range(4), key=lambda c: scores[c]))
    for chunk in (1, 4, 1024):
        got = knn_predict(train, labels, test, k=k, temperature=t, chunk_size=chunk)
        assert got.tolist() == expected


def test_knn_tiny_temperature_does_not_overflow():
    test = torch.tensor([_angle(0)])
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=3, temperature=1e-4).tolist() == [0]


def test_knn_num_classes_and_empty_test():
    test = torch.tensor([_angle(0)])
    assert knn_predict(TRAIN_X, TRAIN_Y, test, k=3, num_classes=10).tolist() == [0]
    empty = knn_predict(TRAIN_X, TRAIN_Y, torch.empty(0, 2), k=3)
    assert empty.shape == (0,) and empty.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"k": 0}, ValueError),
        ({"k": -3}, ValueError),
        ({"k": 1.5}, TypeError),
        ({"k": True}, TypeError),
        ({"temperature": 0.0}, ValueError),
        ({"temperature": -1.0}, ValueError),
        ({"temperature": float("nan")}, ValueError),
        ({"temperature": "hot"}, TypeError),
        ({"num_classes": 1}, ValueError),  # label 1 needs num_classes >= 2
        ({"chunk_size": 0}, ValueError),
    ],
)
def test_knn_predict_bad_arguments(kwargs, exc):
    with pytest.raises(exc) as info:
        knn_predict(TRAIN_X, TRAIN_Y, TRAIN_X, **kwargs)
    name = next(iter(kwargs))
    assert re.search(rf"\b{name}\b", str(info.value)), str(info.value)  # the message names the argument


def test_knn_predict_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        knn_predict(TRAIN_X, torch.tensor([0, 1]), TRAIN_X)  # 3 features, 2 labels
    with pytest.raises(ValueError, match="dimension"):
        knn_predict(TRAIN_X, TRAIN_Y, torch.ones(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        knn_predict(TRAIN_X[:, 0], TRAIN_Y, TRAIN_X)
    with pytest.raises(ValueError, match="negative"):
        knn_predict(TRAIN_X, torch.tensor([0, -1, 1]), TRAIN_X)
    with pytest.raises(TypeError):
        knn_predict(TRAIN_X, torch.tensor([0.5, 1.0, 1.0]), TRAIN_X)


# ---------------------------------------------------------------------------
# knn_accuracy
# ---------------------------------------------------------------------------


def test_knn_accuracy_precomputed_features():
    feats, labels = _clusters()
    acc = knn_accuracy(None, (feats, labels), (feats + 0.05, labels), k=5)
    assert acc == 1.0 and isinstance(acc, float)
    # Half of the test labels deliberately wrong -> exactly 0.5.
    wrong = labels.clone()
    wrong[::2] = (wrong[::2] + 1) % 3
    assert knn_accuracy(None, (feats, labels), (feats, wrong), k=5) == 0.5


def test_knn_accuracy_identity_encoder_on_uint8_images():
    feats, labels = _clusters(n_per_class=6, num_classes=2, dim=4)
    images = (feats.clamp(0, 3) * 80).to(torch.uint8).reshape(-1, 1, 2, 2)
    acc = knn_accuracy(nn.Flatten(), (images, labels), TensorDataset(images, labels), k=3, batch_size=5)
    assert acc == 1.0


def test_knn_accuracy_errors():
    feats, labels = _clusters()
    with pytest.raises(TypeError, match="encoder=None"):
        knn_accuracy(None, TensorDataset(feats, labels), (feats, labels))
    with pytest.raises(ValueError, match=r"^k must be >= 1"):
        knn_accuracy(None, (feats, labels), (feats, labels), k=0)
    with pytest.raises(ValueError, match=r"^temperature must be a finite float > 0"):
        knn_accuracy(None, (feats, labels), (feats, labels), temperature=-0.1)
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(None, (feats, labels[:-1]), (feats, labels))


# ---------------------------------------------------------------------------
# linear_probe
# ---------------------------------------------------------------------------


def test_linear_probe_separable_and_deterministic():
    feats, labels = _clusters(n_per_class=20, num_classes=3, dim=8)
    test_feats, test_labels = _clusters(n_per_class=5, num_classes=3, dim=8, seed=1)
    rng_before = torch.get_rng_state()
    kwargs = dict(epochs=20, lr=0.1, batch_size=16, seed=3)
    r1 = linear_probe(None, (feats, labels), (test_feats, test_labels), **kwargs)
    r2 = linear_probe(None, (feats, labels), (test_feats, test_labels), **kwargs)
    assert torch.equal(rng_before, torch.get_rng_state())  # global RNG untouched
    assert r1 == r2  # bitwise identical
    assert set(r1) == {"train_accuracy", "test_accuracy"}  # 3 classes -> no top-5
    assert r1["train_accuracy"] == 1.0 and r1["test_accuracy"] == 1.0


def test_linear_probe_with_encoder_top5_and_no_normalize():
    feats, labels = _clusters(n_per_class=6, num_classes=6, dim=8)
    images = feats.reshape(-1, 2, 2, 2)
    model = nn.Flatten()
    res = linear_probe(
        model, (images, labels), TensorDataset(images, labels), epochs=30, batch_size=8, normalize=False
    )
    assert res["train_accuracy"] == 1.0 and res["test_accuracy"] == 1.0
    assert res["test_top5_accuracy"] == 1.0


def test_linear_probe_constant_feature_dimension():
    feats, labels = _clusters(n_per_class=10, num_classes=2, dim=4)
    feats[:, 3] = 5.0  # constant on train: must not blow up test features
    test = feats.clone()
    test[:, 3] = 6.0
    res = linear_probe(None, (feats, labels), (test, labels), epochs=10, batch_size=8)
    assert res["test_accuracy"] == 1.0


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"epochs": 0}, ValueError),
        ({"lr": 0.0}, ValueError),
        ({"weight_decay": -1.0}, ValueError),
        ({"batch_size": 0}, ValueError),
        ({"num_classes": 2}, ValueError),
        ({"normalize": "yes"}, TypeError),
    ],
)
def test_linear_probe_bad_arguments(kwargs, exc):
    feats, labels = _clusters(n_per_class=2)
    with pytest.raises(exc, match=rf"\b{next(iter(kwargs))}\b"):
        linear_probe(None, (feats, labels), (feats, labels), **kwargs)


def test_linear_probe_mismatched_dims():
    feats, labels = _clusters(n_per_class=2)
    with pytest.raises(ValueError, match="dimension"):
        linear_probe(None, (feats, labels), (feats[:, :4], labels), epochs=1)


# ---------------------------------------------------------------------------
# collapse_stats
# ---------------------------------------------------------------------------


def test_collapse_stats_identical_rows():
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    s = collapse_stats(row.repeat(10, 1))
    assert s["std_mean"] < 1e-6
    assert s["std_ratio"] < 1e-5
    assert s["effective_rank"] == pytest.approx(1.0)
    assert s["dim"] == 8
    assert s["std_expected"] == pytest.approx(1 / math.sqrt(8))


def test_collapse_stats_isotropic_gaussian():
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    s = collapse_stats(x)
    assert s["std_ratio"] == pytest.approx(1.0, abs=0.03)
    assert 15.5 < s["effective_rank"] <= 16.0 + 1e-9


def test_collapse_stats_rank_two():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g) @ torch.randn(2, 16, generator=g) + torch.randn(16, generator=g)
    s = collapse_stats(x)  # affine rank-2 data: centred matrix has rank 2
    assert 1.0 < s["effective_rank"] <= 2.0 + 1e-6


def test_collapse_stats_hand_computed():
    # Rows [1,0], [0,1]: per-dim unbiased std of (1,0) is sqrt(1/2) = 1/sqrt(D).
    s = collapse_stats(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert s["std_mean"] == pytest.approx(math.sqrt(0.5))
    assert s["std_ratio"] == pytest.approx(1.0)
    # Centred matrix with orthogonal columns: singular values sqrt(2)*1, sqrt(2)*3
    # -> p = (1/4, 3/4), erank = exp(-(1/4 ln 1/4 + 3/4 ln 3/4)).
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    expected = math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert collapse_stats(x)["effective_rank"] == pytest.approx(expected, rel=1e-9)
    # Equal singular values -> erank = 2 exactly.
    assert collapse_stats(x.sign())["effective_rank"] == pytest.approx(2.0)


def test_collapse_stats_errors_and_nan():
    with pytest.raises(ValueError, match="2-D"):
        collapse_stats(torch.randn(16))
    with pytest.raises(ValueError, match="2-D"):
        collapse_stats(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="2 rows"):
        collapse_stats(torch.randn(1, 16))
    with pytest.raises(TypeError, match="embeddings"):
        collapse_stats([[1.0, 2.0], [3.0, 4.0]])
    s = collapse_stats(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    assert math.isnan(s["std_mean"]) and math.isnan(s["effective_rank"]) and s["dim"] == 2


# ---------------------------------------------------------------------------
# extract_features
# ---------------------------------------------------------------------------


def _conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def test_extract_features_restores_modes_and_bn_stats():
    model = _conv_bn_model()
    model.train()
    model[2].eval()  # mixed modes must be restored exactly
    bn = model[1]
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    images = torch.rand(5, 3, 4, 4)
    feats, labels = extract_features(model, (images, torch.arange(5)), batch_size=2)
    assert model.training and model[0].training and model[1].training and not model[2].training
    for before, after in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        assert torch.equal(before, after)
    # 4-D feature map -> global average pooling, computed in eval mode.
    model.eval()
    with torch.no_grad():
        expected = model(images).mean(dim=(2, 3))
    assert torch.allclose(feats, expected, atol=1e-6)
    assert feats.shape == (5, 4) and feats.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3, 4] and labels.dtype == torch.int64


def test_extract_features_restores_buffers_the_encoder_writes():
    class CountsCalls(nn.Module):
        """Writes a buffer even in eval mode (a call counter, a cache): extraction must leave no trace."""

        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return x.flatten(1)

    model = CountsCalls().train()
    feats, _ = extract_features(model, (torch.rand(6, 1, 2, 2), torch.arange(6)), batch_size=2)
    assert feats.shape == (6, 4)
    assert int(model.calls) == 0 and model.training


def test_extract_features_restores_mode_on_error():
    class Boom(nn.Module):
        def forward(self, x):
            assert not self.training
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(model, (torch.rand(2, 1, 2, 2), torch.zeros(2)))
    assert model.training


def test_extract_features_dataset_dataloader_tuple_agree():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 2, 2), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    enc = nn.Flatten()
    f_tuple, l_tuple = extract_features(enc, (images, labels), batch_size=3)
    # uint8 scaled to [0, 1]
    assert torch.allclose(f_tuple, images.flatten(1).float() / 255)
    f_ds, l_ds = extract_features(enc, TensorDataset(images, labels), batch_size=4)
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    f_dl, l_dl = extract_features(enc, loader)
    # PIL dataset (HWC uint8 arrays) converted like to_tensor.
    arrays = images.permute(0, 2, 3, 1).numpy()
    f_pil, l_pil = extract_features(enc, _PILDataset(arrays, labels.tolist()), batch_size=5)
    for f, l in [(f_ds, l_ds), (f_dl, l_dl), (f_pil, l_pil)]:
        assert torch.allclose(f, f_tuple) and torch.equal(l, l_tuple)


def test_extract_features_output_ranks_and_tuple_outputs():
    images = torch.rand(4, 3, 2, 2)
    labels = torch.zeros(4, dtype=torch.long)
    tokens, _ = extract_features(lambda x: x.flatten(2).transpose(1, 2), (images, labels))
    assert torch.allclose(tokens, images.mean(dim=(2, 3)))
    first, _ = extract_features(lambda x: (x.flatten(1).double(), "aux"), (images, labels))
    assert first.dtype == torch.float32 and torch.allclose(first, images.flatten(1))


def test_extract_features_errors():
    images, labels = torch.rand(4, 1, 2, 2), torch.arange(4)
    with pytest.raises(TypeError, match="encoder"):
        extract_features("not callable", (images, labels))
    with pytest.raises(TypeError, match="data"):
        extract_features(nn.Flatten(), {"images": images})
    with pytest.raises(ValueError, match="labels"):
        extract_features(nn.Flatten(), (images, labels[:3]))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(nn.Flatten(), (images, labels), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        extract_features(nn.Flatten(), (images[:0], labels[:0]))
    with pytest.raises(ValueError, match="rank"):
        extract_features(lambda x: x.flatten(1).sum(1), (images, labels))  # rank-1 output
    with pytest.raises(ValueError, match="returned 1 feature rows for a batch of 4"):
        extract_features(lambda x: x.flatten(1)[:1], (images, labels))
    with pytest.raises(TypeError, match="^device must be a torch.device"):
        extract_features(nn.Flatten(), (images, labels), device="gpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = _conv_bn_model()
    images = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2] * 3)
    f_cpu, _ = extract_features(model, TensorDataset(images, labels), batch_size=4)
    model.cuda()
    f_gpu, l_gpu = extract_features(model, TensorDataset(images, labels), batch_size=4)
    assert f_gpu.device.type == "cpu" and l_gpu.device.type == "cpu"
    assert torch.allclose(f_cpu, f_gpu, atol=1e-4)
    assert knn_accuracy(model, (images, labels), (images, labels), k=1) == 1.0
    feats, labs = _clusters()
    res = linear_probe(None, (feats, labs), (feats, labs), epochs=10, batch_size=8, device="cuda")
    assert res["test_accuracy"] == 1.0
