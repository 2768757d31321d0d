"""The decoded cache (byol-train --cache): reuse, rebuild, refusal, crash safety, concurrent builders, sharding."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader

from byol_wrapper import cache as cache_mod
from byol_wrapper.cache import open_cache
from byol_wrapper.data import EpochSampler, ImageFolderDataset, collate_skip_none
from byol_wrapper.decode import FastDecode


def _folder(root: Path, per_class: int = 5, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size + 3 * i, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def _dataset(root: Path, size: int = 8) -> FastDecode:
    return FastDecode(ImageFolderDataset(root, size, warn=False))


def test_cache_holds_the_decoded_folder_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path / "data")
    ds = _dataset(data)
    said: list[str] = []
    cache = open_cache(tmp_path / "cache", ds, say=said.append)
    assert len(cache) == len(ds) == 11 and cache.num_images == 10
    assert cache.skipped == ["c1/broken.jpg"] and any("decoding 11 images" in m for m in said)
    want, want_labels, want_skipped = collate_skip_none([ds[i] for i in range(len(ds))])
    images, labels, skipped = cache[list(range(len(ds)))]
    assert torch.equal(images, want) and torch.equal(labels, want_labels) and skipped == want_skipped == 1
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 8, 8)

    # a second open decodes nothing: the dataset is never indexed
    monkeypatch.setattr(FastDecode, "__getitem__", lambda self, i: pytest.fail("decoded again"))
    said.clear()
    again = open_cache(tmp_path / "cache", _dataset(data), say=said.append)
    assert len(said) == 1 and said[0].startswith("cache: reusing") and "1 unreadable file(s) skipped when it was built: c1/broken.jpg" in said[0]
    broken = [p.name for p in ds.files].index("broken.jpg")
    images, _, skipped = again[[3, broken, 0]]
    assert skipped == 1 and torch.equal(images, want[[3, 0]])


def test_changed_folder_is_rebuilt_and_load_size_gets_its_own_cache(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    first = open_cache(tmp_path / "cache", _dataset(data))
    old_array = first.array_path
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(data / "c0" / "new.png")
    (data / "c0" / "0.png").unlink()
    said: list[str] = []
    ds = _dataset(data)
    rebuilt = open_cache(tmp_path / "cache", ds, say=said.append)
    assert "changed since the cache was built (1 added, 1 removed, 0 modified); rebuilding" in said[0]
    assert not old_array.exists() and rebuilt.array_path.exists()
    want = collate_skip_none([ds[i] for i in range(len(ds))])[0]
    assert torch.equal(rebuilt[list(range(len(ds)))][0], want)

    said.clear()
    other = open_cache(tmp_path / "cache", _dataset(data, size=12), say=said.append)
    assert other.array.shape[1:] == (3, 12, 12) and "decoding" in said[0]
    assert rebuilt.array_path.exists()  # both load sizes stay cached
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


class _Crash(Exception):
    pass


def test_interrupted_build_is_never_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path / "data")
    real = FastDecode.__getitem__

    def crash(self, i):
        if i == 7:
            raise _Crash
        return real(self, i)

    monkeypatch.setattr(FastDecode, "__getitem__", crash)
    with pytest.raises(_Crash):
        open_cache(tmp_path / "cache", _dataset(data))
    assert not list((tmp_path / "cache").glob("*.json"))  # no index: nothing to trust
    assert list((tmp_path / "cache").glob(".*.tmp.npy"))  # the half array stays a temporary
    monkeypatch.setattr(FastDecode, "__getitem__", real)
    said: list[str] = []
    cache = open_cache(tmp_path / "cache", _dataset(data), say=said.append)
    assert "decoding" in said[0] and not list((tmp_path / "cache").glob(".*tmp*"))
    assert cache.num_images == 10

    # an index whose array was truncated (e.g. a copy cut short) is not trusted either
    with open(cache.array_path, "r+b") as f:
        f.truncate(100)
    said.clear()
    again = open_cache(tmp_path / "cache", _dataset(data), say=said.append)
    assert "decoding" in said[0] and again.array.shape == (11, 3, 8, 8)


def _build_in_process(args: tuple[str, str, int]) -> tuple[str, list[str]]:
    data, cache_dir, size = args
    said: list[str] = []
    cache = open_cache(cache_dir, _dataset(Path(data), size), say=said.append)
    return str(cache.array_path), said


def test_two_processes_building_at_once_build_once(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", per_class=30)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_build_in_process, [(str(data), str(tmp_path / "cache"), 8)] * 2)
    (a, said_a), (b, said_b) = results
    assert a == b
    builds = [m for m in said_a + said_b if "decoding" in m]
    reuses = [m for m in said_a + said_b if m.startswith("cache: reusing")]
    assert len(builds) == 1 and len(reuses) == 1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_refuses_without_disk_space_and_bad_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path / "data")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(ValueError, match="needs 0.00 GB but .* free; free some space"):
        open_cache(tmp_path / "cache", _dataset(data))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        open_cache(tmp_path / "file", _dataset(data))


@pytest.mark.parametrize("world", [1, 2])
def test_batches_match_the_folder_path_with_sharding_and_mid_epoch_resume(tmp_path: Path, world: int) -> None:
    data = _folder(tmp_path / "data", per_class=12)
    ds = _dataset(data)
    cache = open_cache(tmp_path / "cache", ds)
    for rank in range(world):
        for start in (0, 4 * world):
            s1 = EpochSampler(len(ds), seed=3, num_replicas=world, rank=rank)
            s2 = EpochSampler(len(ds), seed=3, num_replicas=world, rank=rank)
            s1.set_epoch(2, start)
            s2.set_epoch(2, start)
            folder = list(DataLoader(ds, batch_size=4, sampler=s1, collate_fn=collate_skip_none, drop_last=True))
            cached = list(DataLoader(cache, batch_size=None, sampler=BatchSampler(s2, 4, drop_last=True), collate_fn=lambda b: b))
            assert len(folder) == len(cached) > 0
            for (fi, fl, fs), (ci, cl, cs) in zip(folder, cached):
                assert torch.equal(fi, ci) and torch.equal(fl, cl) and fs == cs


def test_cache_pickles_without_the_map(tmp_path: Path) -> None:
    import pickle

    cache = open_cache(tmp_path / "cache", _dataset(_folder(tmp_path / "data")))
    cache[[0, 1]]
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000 and torch.equal(pickle.loads(blob)[[0, 1]][0], cache[[0, 1]][0])


def _cli(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--backbone", "shufflenet_v2_x0_5", "--backbone-kwargs",
        '{"num_classes": 2}', "--image-size", "16", "--batch-size", "4", "--projection-size", "16",
        "--projection-hidden-size", "32", "--workers", "0", "--device", "cpu", "--no-progress", *extra,
    ]


def test_cli_cache_trains_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from byol_wrapper.train import main

    data = _folder(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_cli(data, tmp_path / "out", "--cache", str(tmp_path / "cache"), "--max-steps", "2")) == 0
        err = capsys.readouterr().err
        assert "cache: decoding 11 images" in err and "1 unreadable file(s) skipped" in err
        assert main(_cli(data, tmp_path / "out", "--cache", str(tmp_path / "cache"), "--max-steps", "4")) == 0
        err = capsys.readouterr().err
        assert "cache: reusing" in err and "resuming" in err
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]

    (tmp_path / "file").write_text("x")
    assert main(_cli(data, tmp_path / "out2", "--cache", str(tmp_path / "file"), "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache" in err[0] and "is not a folder" in err[0]


def test_cli_decode_gpu_without_cuda_falls_back_with_one_info_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from byol_wrapper.train import main

    data = _folder(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_cli(data, tmp_path / "out", "--decode", "gpu", "--max-steps", "1")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("info:")]
    assert lines == ["info: decoding images on the CPU: GPU JPEG decoding is unavailable (the training device is cpu, not CUDA)"]


@pytest.mark.distributed
def test_torchrun_two_ranks_with_cache_train_on_the_same_batches_as_the_folder_path(tmp_path: Path) -> None:
    """DDP sharding + mid-run resume over the cache: the same losses as the folder path, step for step."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from byol_wrapper.demo import generate_demo_dataset
    from tests.test_train_distributed import _argv, _torchrun

    data = Path(generate_demo_dataset(tmp_path / "data", n_train_per_class=4, n_test_per_class=2, image_size=16))
    folder_out, cache_out = tmp_path / "folder", tmp_path / "cached"
    for steps in ("2", "4"):  # the folder path, stopped and resumed the same way
        proc = _torchrun([*_argv(data, folder_out, "--checkpoint-every", "1"), "--max-steps", steps])
        assert proc.returncode == 0, proc.stderr[-3000:]
    cache_argv = [*_argv(data, cache_out, "--checkpoint-every", "1"), "--cache", str(tmp_path / "cache")]
    proc = _torchrun([*cache_argv, "--max-steps", "2"])  # stops mid-epoch (3 steps per epoch) ...
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("cache: decoding") == 1 and "cache: reusing" not in proc.stderr  # rank 0 builds, reports
    proc = _torchrun([*cache_argv, "--max-steps", "4"])  # ... and resumes there
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache: reusing" in proc.stderr and "resuming from" in proc.stderr

    def losses(out: Path) -> list[float]:
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["event"] == "train"]

    assert len(losses(cache_out)) == 4
    np.testing.assert_allclose(losses(cache_out), losses(folder_out), rtol=1e-5)


def test_cli_cache_with_channels_is_refused_and_channels_decode_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--cache holds 8-bit RGB: with --channels it is refused up front (exit 2, one line, nothing written);
    --channels data is decoded at full precision by byol_wrapper.image_io, not by the fast 8-bit decoders."""
    from byol_wrapper.train import main

    data = _folder(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_cli(data, tmp_path / "out", "--cache", str(tmp_path / "cache"), "--channels", "3", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache" in err[0] and "--channels" in err[0]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_cli(data, tmp_path / "out2", "--channels", "3", "--decode", "gpu", "--max-steps", "1")) == 0
    assert "--channels decodes on the CPU" in capsys.readouterr().err
