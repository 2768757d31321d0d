"""Data pipeline throughput: images/s of the loader alone per CPU core, and byol-train end to end.

Table 1 (loader alone, no model): every configuration iterates one epoch of a DataLoader over the same folder of
photo-sized JPEGs (about 500x375, cut from scikit-image's sample photographs: real photo statistics, so JPEG
decoding costs what it costs on real data) at each ``--sizes`` load size, in this process with
``num_workers=0`` and one torch thread, and divides the images by the *process CPU time*: images per CPU-second,
i.e. per core (workers scale it by the number of cores), and steady on a shared machine. Rows:

* ``folder + PIL (today's)``: ``ImageFolderDataset`` (Pillow, JPEG draft to the load size, ``ImageOps.fit``),
  the ``byol-train`` path before the fast decoders.
* ``plain PIL decode + resize``: Pillow full-size decode and ``ImageOps.fit`` (no draft): the reference of the
  "fast decode >= 1.5x" goal at 224 px.
* ``torchvision ImageFolder + PIL transforms``: ``torchvision.datasets.ImageFolder`` with
  ``Resize(S) + CenterCrop(S) + PILToTensor()`` and the default collate: the pipeline lightly and solo-learn use
  (their random crops and colour ops, on the CPU, would only add to it).
* ``fast decode``: ``FastDecode`` (``byol_wrapper.decode``: Pillow draft where a DCT scale fits, else
  torchvision.io / libjpeg-turbo + torch resize), the ``byol-train`` default.
* ``cache``: ``ImageCache`` batches (one numpy gather of a batch from the memory map); the one-off build time is
  printed below the table.
* ``GPU decode`` (CUDA only): workers read bytes, nvJPEG decodes each batch on the device; wall time with a
  final synchronize, since the work is on the GPU (the CPU time of the main process is printed beside it).

Table 2 (end to end): ``byol-train`` images/s (from the ``time`` of the per-step metrics, so start-up, cache
build and evaluation are excluded) on the demo data (16 px PNGs, demo settings) and on CIFAR-size data (32 px
JPEGs: CIFAR-10 train images from ``--cifar DIR`` if given, else generated), each with and without ``--cache``,
in subprocesses with one intra-op thread (``OMP_NUM_THREADS=1``) and ``--workers`` DataLoader workers (default 0:
on 2 cores a worker competes with training).

Command (as recorded in ``benchmarks/RESULTS.md``)::

    python benchmarks/data_pipeline.py --images 256 --cifar /tmp/cifar10/train --e2e-steps 30

Needs scikit-image (the photos): ``pip install scikit-image`` (it is in the ``[test]`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, package_version  # noqa: E402

from byol_wrapper.cache import open_cache  # noqa: E402
from byol_wrapper.data import ImageFolderDataset, collate_skip_none  # noqa: E402
from byol_wrapper.decode import EncodedImages, FastDecode, GPUDecodedBatches, collate_encoded, gpu_decode_error  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "motorcycle_left")


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of 500x375 (some portrait), random crops of scikit-image's photos, in 2 class folders."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        try:
            arr = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is left out
            continue
        if arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 300:
            sources.append(Image.fromarray(arr))
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        size = (500, 375) if rng.random() < 0.8 else (375, 500)
        img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


class PlainPIL(Dataset):
    def __init__(self, folder: ImageFolderDataset) -> None:
        self.files, self.labels, self.size = folder.files, folder.labels, folder.load_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(self.files[i]) as img:
            img = ImageOps.fit(img.convert("RGB"), (self.size, self.size), method=Image.BILINEAR)
        return pil_to_tensor(img), self.labels[i]


def _identity(b):
    return b


def _time_loader(loader, sync: bool = False) -> tuple[float, float, int]:
    """(cpu seconds, wall seconds, images) of one pass."""
    n = 0
    c0, w0 = time.process_time(), time.perf_counter()
    for batch in loader:
        n += batch[0].shape[0]
    if sync:
        torch.cuda.synchronize()
    return time.process_time() - c0, time.perf_counter() - w0, n


def loader_table(root: Path, sizes: list[int], batch: int, repeats: int, cache_dir: Path) -> tuple[list[str], list[str]]:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    gpu_reason = gpu_decode_error(torch.device("cuda"))
    rows: dict[str, dict[int, str]] = {}
    notes: list[str] = []
    names = [
        "folder + PIL (today's)",
        "plain PIL decode + resize",
        "torchvision ImageFolder + PIL transforms",
        "fast decode",
        "cache",
    ]
    if gpu_reason is None:
        names.append("GPU decode (wall, main process)")
    rates: dict[tuple[str, int], float] = {}
    for size in sizes:
        folder = ImageFolderDataset(root, size, warn=False)
        tv = ImageFolder(str(root), transform=T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()]))
        t0 = time.perf_counter()
        cache = open_cache(cache_dir, FastDecode(folder))
        notes.append(f"cache build at {size} px: {len(folder)} images in {time.perf_counter() - t0:.2f} s wall ({cache.array.nbytes / 1e6:.1f} MB)")
        loaders = {
            names[0]: lambda: DataLoader(folder, batch_size=batch, collate_fn=collate_skip_none),
            names[1]: lambda: DataLoader(PlainPIL(folder), batch_size=batch),
            names[2]: lambda: DataLoader(tv, batch_size=batch),
            names[3]: lambda: DataLoader(FastDecode(folder), batch_size=batch, collate_fn=collate_skip_none),
            names[4]: lambda: DataLoader(
                cache, batch_size=None, sampler=BatchSampler(SequentialSampler(cache), batch, drop_last=False), collate_fn=_identity
            ),
        }
        if gpu_reason is None:
            loaders[names[5]] = lambda: GPUDecodedBatches(
                DataLoader(EncodedImages(folder), batch_size=batch, collate_fn=collate_encoded), size, "RGB", torch.device("cuda")
            )
        best: dict[str, float] = {}
        for r in range(repeats + 1):  # configurations interleaved; the first pass warms the page cache
            for name, make in loaders.items():
                cpu, wall, n = _time_loader(make(), sync=name.startswith("GPU"))
                if r:
                    rate = n / (wall if name.startswith("GPU") else cpu)
                    best[name] = max(best.get(name, 0.0), rate)
        for name, rate in best.items():
            rates[(name, size)] = rate
            rows.setdefault(name, {})[size] = f"{rate:,.0f}"
    lines = [
        "| loader (no model) | " + " | ".join(f"{s} px img/s/core" for s in sizes) + " | "
        + " | ".join(f"{s} px vs today's" for s in sizes) + " |",
        "|---|" + "---:|" * (2 * len(sizes)),
    ]
    for name in names:
        ratios = [f"{rates[(name, s)] / rates[(names[0], s)]:.2f}x" for s in sizes]
        lines.append(f"| {name} | " + " | ".join(rows[name][s] for s in sizes) + " | " + " | ".join(ratios) + " |")
    if 224 in sizes:
        notes.append(f"fast decode / plain PIL at 224 px: {rates[(names[3], 224)] / rates[(names[1], 224)]:.2f}x (goal >= 1.5x)")
    if 32 in sizes:
        notes.append(f"cache / today's at 32 px: {rates[(names[4], 32)] / rates[(names[0], 32)]:.1f}x (goal >= 20x)")
    if gpu_reason is not None:
        notes.append(f"GPU decode: not measured ({gpu_reason})")
    return lines, notes


def _cifar_subset(src: Path | None, dst: Path, n: int) -> Path:
    files = sorted(src.rglob("*.jpg")) if src is not None and src.is_dir() else []
    if files:
        step = max(1, len(files) // n)
        for i, f in enumerate(files[::step][:n]):
            target = dst / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
        return dst
    rng = np.random.default_rng(0)  # no CIFAR-10 here: 32 px JPEGs of smooth random colour fields
    for i in range(n):
        arr = np.clip(rng.normal(128, 60, (4, 4, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((32, 32), Image.BICUBIC)
        (dst / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        img.save(dst / f"c{i % 10}" / f"{i}.jpg", quality=90)
    return dst


def _train_rate(argv: list[str], out: Path) -> str:
    cmd = [sys.executable, "-m", "byol_wrapper.train", *argv, "--out", str(out), "--no-progress", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one intra-op thread: steadier on a shared machine
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return f"failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("event") == "train"]
    cfg = json.loads((out / "config.json").read_text())
    if len(train) < 3:
        return "too few steps"
    first, last = train[1], train[-1]  # the first step (warm-up, lazy inits) is left out
    return f"{(last['step'] - first['step']) * cfg['batch_size'] / (last['time'] - first['time']):,.0f}"


def e2e_table(work: Path, cifar: Path | None, steps: int, workers: int, cifar_images: int) -> list[str]:
    lines = ["| byol-train (end to end) | data | without cache img/s | with --cache img/s |", "|---|---|---:|---:|"]
    demo_out = work / "demo"
    common = ["--max-steps", str(steps), "--workers", str(workers), "--eval-every", "0"]
    nocache = _train_rate(["--demo", *common], demo_out / "a")
    shutil.copytree(demo_out / "a" / "demo_data", demo_out / "b" / "demo_data")
    cached = _train_rate(["--demo", *common, "--cache", str(work / "cache")], demo_out / "b")
    lines.append(f"| demo settings (SmallCNN, 16 px, batch 64) | demo data, 1000 16 px PNGs | {nocache} | {cached} |")
    data = _cifar_subset(cifar, work / "cifar", cifar_images)
    argv = [
        "--data", str(data), "--backbone", "byol_wrapper.demo:SmallCNN", "--hidden-layer", "pool", "--image-size", "32",
        "--batch-size", "128", "--optimizer", "adamw", "--lr", "2e-3", "--projection-hidden-size", "512",
        "--projection-size", "128", *common,
    ]
    nocache = _train_rate(argv, work / "c1")
    cached = _train_rate([*argv, "--cache", str(work / "cache")], work / "c2")
    kind = "CIFAR-10 train subset" if cifar is not None and cifar.is_dir() else "generated"
    lines.append(f"| SmallCNN, 32 px, batch 128 | {kind}, {cifar_images} 32 px JPEGs | {nocache} | {cached} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256, help="photo-sized JPEGs in the loader benchmark")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224], help="load sizes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per configuration (best is kept)")
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 JPEG train folder (e.g. /tmp/cifar10/train)")
    p.add_argument("--cifar-images", type=int, default=2560)
    p.add_argument("--e2e-steps", type=int, default=30, help="byol-train steps per end-to-end run (0: skip table 2)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the end-to-end runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="byol-data-bench-"))
    try:
        root = make_photos(work / "photos", args.images)
        lines, notes = loader_table(root, args.sizes, args.batch_size, args.repeats, work / "cache")
        print("#### Loader alone: images per CPU-second (one core), photo-sized JPEGs (~500x375)")
        print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"- device: {device_name(torch.device('cpu'))}")
        print(f"- torch {torch.__version__}, torchvision {package_version('torchvision')}, Pillow {package_version('Pillow')}, python {sys.version.split()[0]}")
        print(f"- load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"- command: `{' '.join(['benchmarks/data_pipeline.py', *sys.argv[1:]])}`")
        print(f"- {args.images} JPEGs, batch {args.batch_size}, num_workers=0, 1 torch thread, best of {args.repeats} passes\n")
        print("\n".join(lines))
        print()
        for n in notes:
            print(f"- {n}")
        if args.e2e_steps:
            print(f"\n#### byol-train end to end ({args.e2e_steps} steps, --workers {args.workers}, 1 thread, CPU, wall time)")
            print(f"- load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
            print("\n".join(e2e_table(work, args.cifar, args.e2e_steps, args.workers, args.cifar_images)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
