"""Image-folder datasets, skipping of unreadable files and the resumable epoch sampler (CPU, 16 px PNGs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from byol_wrapper.data import EpochSampler, ImageFolderDataset, LabelledImageFolder, collate_pairs, collate_skip_none, find_images


def _png(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "I") else (value,) * len(mode)).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for c, v in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _png(root / c / f"{i}.png", value=v)
    _png(root / "dog" / "nested" / "deep.PNG", size=(20, 12))  # nested, upper-case extension, not square
    _png(root / "cat" / "gray.png", mode="L")
    _png(root / "cat" / "alpha.png", mode="RGBA")
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / ".hidden" / "x.png")
    return root


def test_find_images_recursive_sorted_and_filtered(tree: Path) -> None:
    files = find_images(tree)
    names = [p.relative_to(tree).as_posix() for p in files]
    assert names == sorted(names)
    assert "dog/nested/deep.PNG" in names and "cat/notes.txt" not in names
    assert not any(n.startswith(".hidden") for n in names)
    assert len(files) == 9


def test_dataset_returns_fixed_size_uint8_and_class_labels(tree: Path) -> None:
    ds = ImageFolderDataset(tree, load_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 9
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
        assert label == (0 if ds.files[i].relative_to(tree).parts[0] == "cat" else 1)
    gray = ImageFolderDataset(tree, load_size=8, mode="L")[0][0]
    assert gray.shape == (1, 8, 8)


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / f"{i}.jpg")
    ds = ImageFolderDataset(tmp_path, 4)
    assert ds.classes == [] and [ds[i][1] for i in range(3)] == [-1, -1, -1]


def test_unreadable_files_are_skipped_with_a_warning_and_counted(tree: Path) -> None:
    (tree / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = tree / "dog" / "truncated.png"
    data = _png(truncated, size=(64, 64)).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tree, 8)
    bad = [i for i, p in enumerate(ds.files) if p.name in ("broken.png", "truncated.png")]
    for i in bad:
        with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
            assert ds[i] is None
    images, labels, skipped = collate_skip_none([ds[0], None, ds[1], None])
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 0] and skipped == 2
    images, labels, skipped = collate_skip_none([None, None])
    assert images.shape[0] == 0 and labels.numel() == 0 and skipped == 2
    x, y = collate_pairs([ds[0], None])
    assert x.shape == (1, 3, 8, 8) and y.tolist() == [0]


def test_skipped_count_crosses_worker_processes(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "z_bad.png").write_bytes(b"nope")
    ds = ImageFolderDataset(tmp_path, 4, warn=False)
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_skip_none)
    batches = list(loader)
    assert sum(b[2] for b in batches) == 1
    assert sum(b[0].shape[0] for b in batches) == 5


def test_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains no image files"):
        ImageFolderDataset(tmp_path / "empty", 8)
    file = _png(tmp_path / "one.png")
    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolderDataset(file, 8)
    with pytest.raises(TypeError, match="root"):
        ImageFolderDataset(3, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="load_size"):
        ImageFolderDataset(tmp_path, 0)


def test_labelled_folder(tmp_path: Path, tree: Path) -> None:
    train = LabelledImageFolder(tree, 8)
    assert train.classes == ["cat", "dog"]
    test_root = tmp_path / "test"
    _png(test_root / "dog" / "a.png")
    test = LabelledImageFolder(test_root, 8, classes=train.classes)
    assert test.labels == [1]  # the train split's class index, not the test split's
    _png(test_root / "horse" / "b.png")
    with pytest.raises(ValueError, match="not among the train classes"):
        LabelledImageFolder(test_root, 8, classes=train.classes)
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        LabelledImageFolder(flat, 8)


def test_epoch_sampler_is_deterministic_resumable_and_leaves_global_rng_alone() -> None:
    s = EpochSampler(10, seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    s.set_epoch(0)
    order0 = list(s)
    s.set_epoch(1)
    order1 = list(s)
    assert torch.equal(before, torch.get_rng_state())
    assert sorted(order0) == list(range(10)) and order0 != order1
    assert EpochSampler(10, seed=3).order(0) == order0  # same seed and epoch: same order
    s.set_epoch(1, start=4)
    assert list(s) == order1[4:] and len(s) == 6
    batches = list(torch.utils.data.BatchSampler(s, 2, drop_last=True))
    full = list(torch.utils.data.BatchSampler(order1, 2, drop_last=True))
    assert batches == full[2:]  # mid-epoch resume gives exactly the remaining batches
    assert list(EpochSampler(4, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_samples"):
        EpochSampler(0)
    with pytest.raises(ValueError, match="start"):
        s.set_epoch(0, start=11)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("start", [0, 6])
def test_epoch_sampler_shards_the_same_global_batches_over_ranks(world, start) -> None:
    n, per_rank = 29, 2
    batch = per_rank * world
    single = EpochSampler(n, seed=5)
    single.set_epoch(2, start=start)
    global_batches = list(torch.utils.data.BatchSampler(single, batch, drop_last=True))
    rank_batches = []
    for rank in range(world):
        s = EpochSampler(n, seed=5, num_replicas=world, rank=rank)
        s.set_epoch(2, start=start)
        indices = list(s)
        assert len(indices) == len(s) == (n - start) // world  # every rank yields as many indices
        rank_batches.append(list(torch.utils.data.BatchSampler(indices, per_rank, drop_last=True)))
    assert len({len(b) for b in rank_batches}) == 1 and len(rank_batches[0]) == len(global_batches)
    for k, expected in enumerate(global_batches):  # batch k of all ranks together = global batch k
        assert sorted(i for b in rank_batches for i in b[k]) == sorted(expected)


def test_epoch_sampler_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match="num_replicas"):
        EpochSampler(10, num_replicas=0)
    with pytest.raises(ValueError, match="rank must be"):
        EpochSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank must be"):
        EpochSampler(10, num_replicas=2, rank=-1)
