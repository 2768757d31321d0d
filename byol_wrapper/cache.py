"""Decode once: an image folder decoded to a memory-mapped ``uint8`` array, reused across runs and resumes.

``open_cache(cache_dir, dataset)`` returns an :class:`ImageCache` over ``cache_dir/byol-cache-<key>.npy``, where
``key`` names the folder (resolved path), load size and mode: several folders and load sizes can share one
cache folder. Next to the array, ``byol-cache-<key>.json`` is the index: format version, the files (relative
paths, byte sizes and modification times), which files were unreadable (skipped), the labels and the shape.

* **Reuse**: when the folder holds the same files with the same sizes and mtimes, the cache is used as is.
* **Rebuild**: when files were added, removed or modified, a message says how many, and the cache is rebuilt.
* **Refuse**: when the disk does not have room for the array, a ``ValueError`` says how much is needed.
* **Crash safety**: the array and the index are written to temporary files and renamed into place, the index
  last; only an index whose array exists with the recorded size is trusted, so an interrupted build is never
  used (its temporaries are removed by the next build).
* **Concurrency**: builders of one key take an exclusive ``flock`` on ``byol-cache-<key>.lock``; a second
  process (another rank, a second run) waits, then finds the fresh index and reuses it.

Disk cost: ``N x C x S x S`` bytes for ``N`` images at load size ``S`` (CIFAR-10 train at 32 px RGB: 154 MB;
ImageNet-1k train at 160 px: 98 GB).

The cache is indexed like the folder dataset (one index per file, in the same sorted order), so the same
:class:`~byol_wrapper.data.EpochSampler` (DDP sharding, mid-epoch resume) gives the same batches as the folder
path, and a skipped file is dropped and counted in its batch as there. Batches are index slices of the map: with
``DataLoader(cache, batch_size=None, sampler=BatchSampler(sampler, b, drop_last=True))``,
:meth:`ImageCache.__getitem__` receives a whole batch of file indices and answers with one numpy gather, no
per-image Python work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CACHE_VERSION", "ImageCache", "cache_bytes", "open_cache"]

CACHE_VERSION = 1
"""Bumped when the layout or the decoding changes, so old caches are rebuilt."""


def cache_bytes(num_images: int, channels: int, load_size: int) -> int:
    """Disk size of the array of a cache: one byte per pixel and channel."""
    return num_images * channels * load_size * load_size


class ImageCache(Dataset):
    """A decoded image folder in a memory-mapped ``(N, C, S, S)`` uint8 array; indexed by batches of indices.

    The map is opened lazily in each process (DataLoader workers open their own; pickling never copies it).

    Args:
        array_path: The ``.npy`` array.
        rows: Row of the array per file index, ``-1`` for a file that could not be decoded.
        labels: Label per file index.
        classes: Class names.
        skipped: Relative paths of the files that could not be decoded when the cache was built.
    """

    def __init__(self, array_path: Path, rows: Sequence[int], labels: Sequence[int], classes: Sequence[str], skipped: Sequence[str]) -> None:
        self.array_path = Path(array_path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.num_images = int((self.rows >= 0).sum())
        self.skipped = list(skipped)
        self._array: Optional[np.ndarray] = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(images (B, C, S, S) uint8, labels (B,), skipped)`` for a batch of file indices.

        Files that could not be decoded are dropped and counted in ``skipped``, as
        :func:`~byol_wrapper.data.collate_skip_none` does on the folder path.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self.rows[idx]
        good = rows >= 0
        skipped = int(len(rows) - np.count_nonzero(good))
        if skipped:
            rows, idx = rows[good], idx[good]
        return torch.from_numpy(self.array[rows]), torch.from_numpy(self.labels[idx]), skipped


def _identity(batch: Any) -> Any:
    return batch


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _key(root: Path, load_size: int, mode: str) -> str:
    text = json.dumps({"root": str(root.resolve()), "load_size": load_size, "mode": mode, "version": CACHE_VERSION})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; renames still keep every trusted cache whole
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stats(root: Path, files: Sequence[Path]) -> tuple[list[str], list[int], list[int]]:
    rel, sizes, mtimes = [], [], []
    for p in files:
        try:
            st = os.stat(p)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # vanished or unreadable since the scan: it will be skipped (and re-checked next time)
            size, mtime = -1, -1
        rel.append(Path(p).relative_to(root).as_posix())
        sizes.append(size)
        mtimes.append(mtime)
    return rel, sizes, mtimes


def _changes(index: dict[str, Any], rel: list[str], sizes: list[int], mtimes: list[int]) -> str:
    old = {f: (s, m) for f, s, m in zip(index["files"], index["sizes"], index["mtimes_ns"])}
    new = {f: (s, m) for f, s, m in zip(rel, sizes, mtimes)}
    added = len(new.keys() - old.keys())
    removed = len(old.keys() - new.keys())
    modified = sum(1 for f in new.keys() & old.keys() if new[f] != old[f])
    return f"{added} added, {removed} removed, {modified} modified"


def _valid(index: dict[str, Any], cache_dir: Path) -> bool:
    try:
        array = cache_dir / index["array"]
        expected = cache_bytes(len(index["files"]), index["channels"], index["load_size"])
        return array.is_file() and array.stat().st_size >= expected and index.get("version") == CACHE_VERSION
    except (KeyError, TypeError, OSError):
        return False


def _read_index(path: Path) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else None
    except (OSError, ValueError):
        return None


def open_cache(
    cache_dir: str | os.PathLike[str],
    dataset: Any,
    *,
    workers: int = 0,
    say: Optional[Callable[[str], None]] = None,
    progress: bool = False,
) -> ImageCache:
    """Opens the cache of ``dataset`` in ``cache_dir``, building (or rebuilding) it first when needed.

    Args:
        cache_dir: Folder of caches (created if missing).
        dataset: An :class:`~byol_wrapper.data.ImageFolderDataset` (or a :class:`~byol_wrapper.decode.FastDecode`
            of one): its ``root``, ``files``, ``labels``, ``classes``, ``load_size`` and ``mode`` define the cache,
            and its items are what is stored (``None`` items are recorded as skipped).
        workers: DataLoader workers decoding while building.
        say: Receives the one-line messages (reuse, rebuild and why, build summary).
        progress: Show a progress bar (tqdm) while building.

    Returns:
        The cache, indexed by batches of row indices.

    Raises:
        ValueError: ``cache_dir`` is not a folder or cannot be written, or the disk has too little free space.
    """
    say = say or (lambda m: None)
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(f"cache dir {str(cache_dir)!r} is not a folder; pass a folder to hold the decoded cache")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the cache dir {str(cache_dir)!r}: {exc}") from exc
    root = Path(dataset.root)
    load_size, mode = int(dataset.load_size), str(dataset.mode)
    files = list(dataset.files)
    key = _key(root, load_size, mode)
    index_path = cache_dir / f"byol-cache-{key}.json"
    rel, sizes, mtimes = _stats(root, files)
    try:
        lock = _locked(cache_dir / f"byol-cache-{key}.lock")
        lock.__enter__()
    except OSError as exc:
        raise ValueError(f"cannot write in the cache dir {str(cache_dir)!r}: {exc}") from exc
    try:
        index = _read_index(index_path)
        if index is not None and _valid(index, cache_dir):
            if index["files"] == rel and index["sizes"] == sizes and index["mtimes_ns"] == mtimes:
                say(
                    f"cache: reusing {cache_dir / index['array']} ({index['num_images']} images at {load_size} px"
                    + (
                        f", {len(index['skipped'])} unreadable file(s) skipped when it was built: "
                        + ", ".join(index["skipped"][:5])
                        + (", ..." if len(index["skipped"]) > 5 else "")
                        if index["skipped"]
                        else ""
                    )
                    + ")"
                )
                return _cache_of(index, cache_dir)
            say(f"cache: {root} changed since the cache was built ({_changes(index, rel, sizes, mtimes)}); rebuilding it")
        return _build(cache_dir, key, index, dataset, root, rel, sizes, mtimes, workers, say, progress)
    finally:
        lock.__exit__(None, None, None)


def _cache_of(index: dict[str, Any], cache_dir: Path) -> ImageCache:
    return ImageCache(cache_dir / index["array"], index["rows"], index["labels"], index["classes"], index["skipped"])


def _build(
    cache_dir: Path,
    key: str,
    old: Optional[dict[str, Any]],
    dataset: Any,
    root: Path,
    rel: list[str],
    sizes: list[int],
    mtimes: list[int],
    workers: int,
    say: Callable[[str], None],
    progress: bool,
) -> ImageCache:
    for stale in cache_dir.glob(f".byol-cache-{key}-*.tmp*"):  # an interrupted build (we hold the lock)
        stale.unlink(missing_ok=True)
    n, load_size = len(rel), int(dataset.load_size)
    channels = 1 if dataset.mode == "L" else 3
    need = cache_bytes(n, channels, load_size)
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        raise ValueError(
            f"the cache of {n} images at {load_size} px needs {need / 1e9:.2f} GB but {str(cache_dir)!r} has "
            f"{free / 1e9:.2f} GB free; free some space, pass another cache dir, or a smaller load size"
        )
    build = uuid.uuid4().hex[:8]
    final = f"byol-cache-{key}-{build}.npy"
    tmp = cache_dir / f".byol-cache-{key}-{build}.tmp.npy"
    say(f"cache: decoding {n} images of {root} at {load_size} px into {cache_dir / final} ({need / 1e6:.0f} MB)")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, channels, load_size, load_size))
    rows = [-1] * n
    skipped: list[str] = []
    # A private generator: the loader's seed must not be drawn from the global RNG (the run's augmentations).
    loader = DataLoader(_Indexed(dataset), batch_size=64, num_workers=workers, collate_fn=_identity, generator=torch.Generator())
    bar = None
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="caching", unit="img", dynamic_ncols=True)
    row = 0
    for batch in loader:
        for i, sample in batch:
            if sample is None:
                skipped.append(rel[i])
                continue
            array[row] = sample[0].numpy()
            rows[i] = row
            row += 1
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    array.flush()
    del array
    _fsync(tmp)
    os.replace(tmp, cache_dir / final)
    index = {
        "version": CACHE_VERSION,
        "root": str(root.resolve()),
        "load_size": load_size,
        "mode": dataset.mode,
        "channels": channels,
        "array": final,
        "num_images": row,
        "files": rel,
        "sizes": sizes,
        "mtimes_ns": mtimes,
        "rows": rows,
        "labels": [int(v) for v in dataset.labels],
        "classes": list(dataset.classes),
        "skipped": skipped,
    }
    tmp_index = cache_dir / f".byol-cache-{key}-{build}.tmp.json"
    with open(tmp_index, "w", encoding="utf-8") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_index, cache_dir / f"byol-cache-{key}.json")  # the commit point: only now is the cache trusted
    with contextlib.suppress(OSError):
        _fsync(cache_dir)
    if old is not None and old.get("array") and old["array"] != final:
        (cache_dir / old["array"]).unlink(missing_ok=True)  # readers that have it mapped keep their pages
    for orphan in cache_dir.glob(f"byol-cache-{key}-*.npy"):  # arrays of builds whose index never landed
        if orphan.name != final:
            orphan.unlink(missing_ok=True)
    say(f"cache: {row} images cached" + (f", {len(skipped)} unreadable file(s) skipped" if skipped else ""))
    if row == 0:
        raise ValueError(f"no image of {root} could be decoded; check the files")
    return _cache_of(index, cache_dir)
