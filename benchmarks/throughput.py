"""Training throughput (images/s) and peak memory of BYOL: a backbone-only floor, byol_wrapper, byol-pytorch, lightly.

Configurations (``--configs``, all by default), each timed in a fresh Python process (``--no-isolate`` runs them in
this one) so that peak memory and compiled code do not leak between them:

* ``floor``        -- hand-written loop doing only the backbone work BYOL cannot avoid: online forward + backward
  on both views (a dummy loss on the pooled features) and target forward (``no_grad``) on both views, each view
  its own batch of B. No augmentation, no heads, no loss, no optimizer, no EMA. The views are two fixed tensors.
* ``floor_concat`` -- the same with both views in one batch of 2B (the floor for ``concat_views=True``).
* ``ours``         -- ``byol_wrapper.BYOL`` with its default per-sample augmentations (the paper's two views, on
  the device) and ``concat_views=False`` (default: BatchNorm per view), Adam, ``update_moving_average()``.
* ``ours_concat``  -- the same with ``concat_views=True`` (both views in one batch, byol-pytorch's behaviour).
* ``byol_pytorch`` -- byol-pytorch 0.9.1 with ``use_simplicial_embeddings=False`` (its default ``True`` adds an
  extra block; off, it has the same network as ours), its own augmentation (one random draw per batch), views
  concatenated, Adam, ``update_moving_average()``.
* ``lightly``      -- lightly 1.6's BYOL as in its example (``examples/pytorch/byol.py``): ``BYOLTransform``
  (paper views, PIL + torchvision, *per sample on the CPU*) in ``--workers`` DataLoader worker processes over a
  synthetic in-memory dataset of PIL images, ``BYOLProjectionHead`` / ``BYOLPredictionHead`` (4096/256, as ours),
  ``NegativeCosineSimilarity``, ``update_momentum`` of backbone and projection head, each view its own batch.
* ``lightly_loader`` -- lightly's data pipeline alone (DataLoader + BYOLTransform, batches moved to the device,
  no model): the ceiling that CPU augmentation puts on ``lightly``.
* ``ours_augment`` -- byol_wrapper's two views (``byol_views``, per sample, on the device, ``no_grad``) of the fixed
  batch, no model: the cost of our augmentation inside ``ours``, and the figure for the "augmentation alone"
  target (images/s = source images, each giving two views).

All learners use the same backbone (torchvision ResNet, ``fc`` replaced by ``nn.Identity``, hidden layer
``avgpool``), heads Linear(4096)-BN-ReLU-Linear(256), tau 0.99, Adam (lr 3e-4). Inputs of ``floor``, ``ours*``
and ``byol_pytorch`` are a fixed batch already on the device (as if decoded by a loader): float32 in [0, 1]
(``--input-dtype uint8`` feeds ours uint8). Images/s counts source images (each makes two views) over the timed
steps, with ``torch.cuda.synchronize()`` only at the start and the end (so a GPU can run ahead, as in training).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` over the timed steps (reset after warmup; includes
weights, optimizer state and activations). On the CPU there is no allocator counter, so it is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set, a high-water mark) minus the
resident set right after the imports: the memory the configuration added at its peak, model build included
(hence the process per configuration). DataLoader workers (``lightly``) are other processes and are not in it;
their largest peak RSS is printed in the notes.

GPU configurations to run (H100 / H200; ``--device cuda`` is the default when CUDA is available)::

    # ImageNet-style: ResNet-50 at 224 px, batch 256 (two views -> 512 images through each network)
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --precision bf16 --channels-last
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --precision bf16 --channels-last --compile
    # CIFAR: ResNet-18 with the CIFAR stem at 32 px, batch 512
    python benchmarks/throughput.py --backbone resnet18 --image-size 32 --batch-size 512 --cifar-stem
    python benchmarks/throughput.py --backbone resnet18 --image-size 32 --batch-size 512 --cifar-stem --precision bf16 --channels-last
    python benchmarks/throughput.py --backbone resnet18 --image-size 32 --batch-size 512 --cifar-stem --precision bf16 --channels-last --compile
    # what keeps ours from the floor (top ops by self device time)
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --batch-size 256 --no-cifar-stem --precision bf16 --channels-last --profile

(``--workers`` defaults to the CPU count: 16 on those machines; ``--compile learner`` compiles the whole learner
instead of the backbones.)

CPU (default here): ResNet-18, CIFAR stem, 32 px, batch 64::

    python benchmarks/throughput.py --steps 5 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import byol_wrapper  # noqa: E402
from _common import device_name, package_version, setup_torch  # noqa: E402
from byol_wrapper import BYOL, byol_views  # noqa: E402

_RSS_AT_IMPORT = 0  # set in main()
RESULT_TAG = "@@BYOL_THROUGHPUT_RESULT "
ALL_CONFIGS = ("floor", "floor_concat", "ours", "ours_concat", "byol_pytorch", "lightly", "lightly_loader", "ours_augment")
DESCRIPTION = {
    "floor": ("floor: backbone only", "per view (B, B)"),
    "floor_concat": ("floor: backbone only", "one batch (2B)"),
    "ours": ("byol_wrapper (default)", "per view (B, B)"),
    "ours_concat": ("byol_wrapper concat_views=True", "one batch (2B)"),
    "byol_pytorch": ("byol-pytorch 0.9.1", "one batch (2B)"),
    "lightly": ("lightly 1.6 BYOL example (CPU transforms)", "per view (B, B)"),
    "lightly_loader": ("lightly data pipeline alone (no model)", "-"),
    "ours_augment": ("byol_wrapper augmentation alone (no model)", "-"),
}


# ------------------------------------------------------------------------------------------------ environment
def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    rss = resource.getrusage(who).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # KiB on Linux, bytes on macOS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(args: argparse.Namespace, device: torch.device):
    if args.precision == "32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)


def make_scaler(args: argparse.Namespace, device: torch.device):
    return torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")


# ------------------------------------------------------------------------------------------------ models
def make_backbone(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """torchvision ResNet with ``fc = Identity``; same initial weights in every configuration."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.backbone)(weights=None)
    if args.cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def maybe_compile(module: nn.Module, args: argparse.Namespace) -> None:
    """``nn.Module.compile()`` in place: keeps the module object, its names and its hooks."""
    if args.compile != "none":
        module.compile()


def fixed_batch(args: argparse.Namespace, device: torch.device, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=g, dtype=torch.uint8)
    x = x.to(device)
    if dtype != torch.uint8:
        x = x.to(dtype).div_(255.0)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


Step = Callable[[], None]


def build_floor(args: argparse.Namespace, device: torch.device, concat: bool) -> tuple[Step, nn.Module | None, dict]:
    online = make_backbone(args, device)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    maybe_compile(online, args)
    maybe_compile(target, args)
    one, two = fixed_batch(args, device, 1), fixed_batch(args, device, 2)
    both = torch.cat((one, two))
    if args.channels_last:
        both = both.contiguous(memory_format=torch.channels_last)
    views = (both,) if concat else (one, two)

    def step() -> None:
        with autocast_ctx(args, device):
            loss = sum(online(v).float().square().mean() for v in views)
        online.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad(), autocast_ctx(args, device):
            for v in views:
                target(v)

    return step, None, {}


def train_step(learner: nn.Module, x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> Step:
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=args.lr)
    scaler = make_scaler(args, device)

    def step() -> None:
        with autocast_ctx(args, device):
            loss = learner(x)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        learner.update_moving_average()

    return step


def compile_learner(learner: nn.Module, args: argparse.Namespace) -> None:
    """``--compile learner|backbone`` for byol_wrapper's and byol-pytorch's learners (same attribute names)."""
    if args.compile == "learner":
        learner.compile()
    elif args.compile == "backbone":
        maybe_compile(learner.online_encoder.net, args)
        maybe_compile(learner.target_encoder.net, args)


def build_ours(args: argparse.Namespace, device: torch.device, concat: bool) -> tuple[Step, nn.Module, dict]:
    net = make_backbone(args, device)
    # No learner.to(device): the backbone is on the device and the heads are built there.
    learner = BYOL(net, args.image_size, hidden_layer="avgpool", projection_size=256, projection_hidden_size=4096,
                   moving_average_decay=0.99, concat_views=concat)
    compile_learner(learner, args)
    x = fixed_batch(args, device, 1, torch.uint8 if args.input_dtype == "uint8" else torch.float32)
    return train_step(learner, x, args, device), learner, {}


def build_byol_pytorch(args: argparse.Namespace, device: torch.device) -> tuple[Step, nn.Module, dict]:
    try:
        from byol_pytorch import BYOL as TheirBYOL
    except ImportError as e:
        raise RuntimeError(f"byol-pytorch is not installed (pip install byol-pytorch==0.9.1 beartype): {e}") from e
    net = make_backbone(args, device)
    learner = TheirBYOL(net, args.image_size, hidden_layer="avgpool", projection_size=256, projection_hidden_size=4096,
                        moving_average_decay=0.99, use_simplicial_embeddings=False)
    compile_learner(learner, args)
    x = fixed_batch(args, device, 1)  # its Normalize needs float input
    return train_step(learner, x, args, device), learner, {}


# ------------------------------------------------------------------------------------------------ lightly
class SyntheticPILDataset(torch.utils.data.Dataset):
    """``length`` items cycling over a few in-memory RGB PIL images, each passed through ``transform``."""

    def __init__(self, size: int, length: int, transform: Callable, distinct: int = 256) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
                       for _ in range(min(distinct, length))]
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.transform(self.images[index % len(self.images)])


def lightly_loader(args: argparse.Namespace, device: torch.device):
    try:
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    except ImportError as e:
        raise RuntimeError(f"lightly is not installed (pip install lightly): {e}") from e
    # The paper's views (lightly's defaults: blur 1.0 / 0.1, solarize 0 / 0.2), the same work as ours. (lightly's
    # CIFAR example turns the blur off with gaussian_blur=0.0; not done here, to keep the augmentations equal.)
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=args.image_size),
        view_2_transform=BYOLView2Transform(input_size=args.image_size),
    )
    steps = args.warmup + args.steps
    dataset = SyntheticPILDataset(args.image_size, steps * args.batch_size, transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )


class LightlyBYOL(nn.Module):
    """lightly's examples/pytorch/byol.py model, with ours' head sizes."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, 4096, 256)
        self.prediction_head = BYOLPredictionHead(256, 4096, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(y)
        return self.prediction_head(z)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        z = self.projection_head_momentum(y)
        return z.detach()


def build_lightly(args: argparse.Namespace, device: torch.device, with_model: bool) -> tuple[Step, nn.Module | None, dict]:
    loader = lightly_loader(args, device)
    batches = iter(loader)
    state: dict = {"loader": loader, "iter": batches}

    def next_views() -> tuple[torch.Tensor, torch.Tensor]:
        (x0, x1) = next(state["iter"])
        x0 = x0.to(device, non_blocking=True)
        x1 = x1.to(device, non_blocking=True)
        if args.channels_last:
            x0, x1 = x0.contiguous(memory_format=torch.channels_last), x1.contiguous(memory_format=torch.channels_last)
        return x0, x1

    if not with_model:
        return (lambda: next_views() and None), None, state

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum

    backbone = make_backbone(args, device)
    with torch.no_grad():
        probe = torch.zeros(2, 3, args.image_size, args.image_size, device=device)
        feature_dim = backbone.eval()(probe).flatten(1).shape[1]
        backbone.train()
    model = LightlyBYOL(backbone, feature_dim).to(device)
    if args.compile == "learner":
        model.compile()
        model.forward_momentum = torch.compile(model.forward_momentum)
    elif args.compile == "backbone":
        maybe_compile(model.backbone, args)
        maybe_compile(model.backbone_momentum, args)
    criterion = NegativeCosineSimilarity()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scaler = make_scaler(args, device)
    tau = 0.99

    def step() -> None:
        x0, x1 = next_views()
        update_momentum(model.backbone, model.backbone_momentum, m=tau)
        update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
        with autocast_ctx(args, device):
            p0 = model(x0)
            z0 = model.forward_momentum(x0)
            p1 = model(x1)
            z1 = model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0.float(), z1.float()) + criterion(p1.float(), z0.float()))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step, model, state


def build_ours_augment(args: argparse.Namespace, device: torch.device) -> tuple[Step, nn.Module | None, dict]:
    """byol_wrapper's two paper views of the fixed batch, on the device, as the learner runs them (no model)."""
    view1, view2 = byol_views(args.image_size)
    view1.to(device)
    view2.to(device)
    x = fixed_batch(args, device, 1, torch.uint8 if args.input_dtype == "uint8" else torch.float32)

    def step() -> None:
        with torch.no_grad():
            view1(x)
            view2(x)

    return step, None, {}


def build(name: str, args: argparse.Namespace, device: torch.device) -> tuple[Step, nn.Module | None, dict]:
    if name in ("floor", "floor_concat"):
        return build_floor(args, device, concat=name == "floor_concat")
    if name in ("ours", "ours_concat"):
        return build_ours(args, device, concat=name == "ours_concat")
    if name == "byol_pytorch":
        return build_byol_pytorch(args, device)
    if name in ("lightly", "lightly_loader"):
        return build_lightly(args, device, with_model=name == "lightly")
    if name == "ours_augment":
        return build_ours_augment(args, device)
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------ measuring
def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    step, _, state = build(name, args, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    t_start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)  # per-step launch/host time on CUDA; wall time on CPU
    sync(device)
    elapsed = time.perf_counter() - t_start
    result = {
        "name": name,
        "images_per_s": args.steps * args.batch_size / elapsed,
        "ms_per_step": elapsed / args.steps * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "notes": [],
    }
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["peak_bytes"] = maxrss_bytes() - _RSS_AT_IMPORT
    if "iter" in state:  # lightly: let the workers finish, then read their peak RSS
        del state["iter"]
        state.clear()
        worker_peak = maxrss_bytes(resource.RUSAGE_CHILDREN)
        if worker_peak:
            result["notes"].append(f"largest DataLoader worker peak RSS {worker_peak / 2**20:.0f} MiB, pages shared with the "
                                  f"main process after fork included (not in the column)")
    return result


def run_child(name: str, args: argparse.Namespace) -> dict:
    """Runs ``name`` in a fresh interpreter; returns its result or ``{'error': ...}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.forward_argv, "--_child", name]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"name": name, "error": (tail[-1] if tail else f"exit status {proc.returncode}")[:300], "stderr": proc.stderr[-3000:]}


def run_in_process(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    try:
        return measure(name, args, device)
    except Exception as e:  # noqa: BLE001 - report and go on (e.g. torch.compile failures)
        traceback.print_exc()
        return {"name": name, "error": f"{type(e).__name__}: {e}"[:300]}


# ------------------------------------------------------------------------------------------------ report
def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_report(results: list[dict], args: argparse.Namespace, device: torch.device) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    mem_kind = ("torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda" else
                "peak RSS (ru_maxrss) minus RSS after imports, per process; CPU has no allocator counter")
    print(f"### BYOL training throughput: {args.backbone}{' (CIFAR stem)' if args.cifar_stem else ''}, "
          f"{args.image_size} px, batch {args.batch_size}")
    print()
    print(f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"- device: {device_name(device)}")
    print(f"- torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}; "
          f"byol_wrapper {byol_wrapper.__version__}, byol-pytorch {package_version('byol-pytorch')}, "
          f"lightly {package_version('lightly')}")
    print(f"- torch threads: {args.threads or torch.get_num_threads()}; DataLoader workers (lightly): {args.workers}; "
          f"load average at the end: {load}")
    print(f"- precision {args.precision}{' (autocast)' if args.precision != '32' else ''}, channels_last "
          f"{args.channels_last}, compile {args.compile}, input {args.input_dtype} on the device (lightly: PIL "
          f"images through its CPU transforms); {args.steps} timed steps after {args.warmup} warmup, each "
          f"configuration in {'its own process' if not args.no_isolate else 'this process'}")
    print(f"- peak memory: {mem_kind}")
    print(f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`")
    print()
    print("| configuration | BatchNorm over views | images/s | ms/step | peak memory | images/s vs matching floor |")
    print("|---|---|---:|---:|---:|---:|")
    by = {r["name"]: r for r in results if "error" not in r}
    floor_of = {"ours": "floor", "lightly": "floor", "ours_concat": "floor_concat", "byol_pytorch": "floor_concat"}
    for r in results:
        label, bn = DESCRIPTION[r["name"]]
        if "error" in r:
            print(f"| {label} | {bn} | failed | | | {r['error'].replace('|', '/')} |")
            continue
        f = floor_of.get(r["name"])
        vs = f"{r['images_per_s'] / by[f]['images_per_s']:.2f}" if f in by else ("1.00 (floor)" if r["name"].startswith("floor") else "")
        print(f"| {label} | {bn} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {fmt_bytes(r['peak_bytes'])} | {vs} |")
    print()
    pairs = [
        ("ours", "floor", "byol_wrapper default / floor (per view)"),
        ("ours_concat", "floor_concat", "byol_wrapper concat_views=True / floor (one batch)"),
        ("ours_concat", "byol_pytorch", "byol_wrapper concat_views=True / byol-pytorch (both one batch; augmentations differ)"),
        ("ours", "byol_pytorch", "byol_wrapper default / byol-pytorch"),
        ("ours", "lightly", "byol_wrapper default / lightly (both per view, paper augmentations; lightly's on CPU workers)"),
        ("ours_concat", "lightly", "byol_wrapper concat_views=True / lightly"),
        ("ours_augment", "lightly_loader", "augmentation alone: byol_wrapper (on the device) / lightly (CPU workers)"),
    ]
    rows = [(text, by[a]["images_per_s"] / by[b]["images_per_s"]) for a, b, text in pairs if a in by and b in by]
    if rows:
        print("| ratio of images/s (> 1: byol_wrapper faster) | value |")
        print("|---|---:|")
        for text, value in rows:
            print(f"| {text} | {value:.2f} |")
        print()
    notes = [f"{r['name']}: {n}" for r in results for n in r.get("notes", [])]
    notes += [f"{r['name']} failed: {r['error']}" for r in results if "error" in r]
    for n in notes:
        print(f"- {n}")
    if notes:
        print()


# ------------------------------------------------------------------------------------------------ profile
def profile(args: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler over a few steps of byol_wrapper; prints a phase breakdown and the top ops."""
    from torch.profiler import ProfilerActivity, record_function

    name = args.profile_config
    step, learner, _ = build(name, args, device)
    assert isinstance(learner, BYOL)
    # Label the phases without touching the library: wrap augment, and bracket the encoders/predictor with hooks.
    augment = learner.augment

    def labelled_augment(x):
        with record_function("byol: augment (both views)"):
            return augment(x)

    learner.augment = labelled_augment
    handles, open_ranges = [], {}
    for label, module in (("byol: online encoder fwd", learner.online_encoder), ("byol: predictor fwd", learner.online_predictor),
                          ("byol: target encoder fwd", learner.target_encoder)):
        def pre(mod, inp, label=label):
            rf = record_function(label)
            rf.__enter__()
            open_ranges.setdefault(label, []).append(rf)

        def post(mod, inp, out, label=label):
            open_ranges[label].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    opt_step = learner.update_moving_average

    def labelled_ema():
        with record_function("byol: EMA update"):
            opt_step()

    learner.update_moving_average = labelled_ema

    for _ in range(args.warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.profile_steps):
            with record_function("byol: whole step"):
                step()
        sync(device)
    for h in handles:
        h.remove()
    cuda = device.type == "cuda"
    events = prof.key_averages()
    print(f"### Profile of {DESCRIPTION[name][0]}: {args.backbone}, {args.image_size} px, batch {args.batch_size}, "
          f"precision {args.precision}, channels_last {args.channels_last}, compile {args.compile}, "
          f"{args.profile_steps} steps, {device_name(device)}")
    print()
    print("Phases (the rest of the whole step is backward, optimizer and loss):")
    print()
    print("| phase | CPU total ms / step |" + (" device total ms / step |" if cuda else ""))
    print("|---|---:|" + ("---:|" if cuda else ""))
    for e in sorted((e for e in events if e.key.startswith("byol:")), key=lambda e: -e.cpu_time_total):
        row = f"| {e.key[6:]} | {e.cpu_time_total / 1e3 / args.profile_steps:.2f} |"
        if cuda:
            row += f" {e.device_time_total / 1e3 / args.profile_steps:.2f} |"
        print(row)
    print()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"Top ops by {sort_by} (all {args.profile_steps} steps):")
    print()
    print("```")
    print(events.table(sort_by=sort_by, row_limit=args.profile_rows, max_name_column_width=60))
    print("```")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"], default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 CPU, 10 CUDA; more with --compile)")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 conv1 and no maxpool (default: on when --image-size <= 64)")
    p.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32", help="autocast dtype (fp16 adds a GradScaler)")
    p.add_argument("--channels-last", action="store_true", help="backbones and inputs in channels_last")
    p.add_argument("--compile", nargs="?", const="backbone", default="none", choices=["none", "backbone", "learner"],
                   help="torch.compile: the backbones in place (--compile) or the whole learner (--compile learner)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the timed process")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers for lightly (default: CPU count)")
    p.add_argument("--input-dtype", choices=["float", "uint8"], default="float", help="input batch dtype for ours")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help=f"comma-separated subset of {','.join(ALL_CONFIGS)}")
    p.add_argument("--no-isolate", action="store_true", help="run all configurations in this process (CPU memory is then cumulative)")
    p.add_argument("--profile", action="store_true", help="profile a few steps of byol_wrapper instead of timing")
    p.add_argument("--profile-config", choices=["ours", "ours_concat"], default="ours")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.forward_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    return args


def main(argv: list[str] | None = None) -> None:
    global _RSS_AT_IMPORT
    _RSS_AT_IMPORT = current_rss()
    args = parse_args(argv)
    device = setup_torch(args.device, args.threads)
    cuda = device.type == "cuda"
    if args.cifar_stem is None:
        args.cifar_stem = args.image_size <= 64
    args.steps = args.steps or (50 if cuda else 10)
    if args.warmup is None:
        args.warmup = (10 if cuda else 2) + (3 if args.compile != "none" else 0)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {ALL_CONFIGS}")

    if args._child:
        result = run_in_process(args._child, args, device)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    if args.profile:
        profile(args, device)
        return
    results = []
    for name in configs:
        print(f"[throughput] {name} ...", file=sys.stderr, flush=True)
        r = run_in_process(name, args, device) if args.no_isolate else run_child(name, args)
        if "error" in r:
            print(f"[throughput] {name} failed: {r['error']}", file=sys.stderr)
            if r.get("stderr"):
                print(r["stderr"], file=sys.stderr)
        else:
            print(f"[throughput] {name}: {r['images_per_s']:.1f} images/s", file=sys.stderr)
        results.append(r)
    print_report(results, args, device)


if __name__ == "__main__":
    main()
