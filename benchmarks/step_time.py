"""Training-step time of byol_wrapper vs byol-pytorch 0.9.1, and the cost of the EMA target update.

Table 1 times one full training step -- the learner's forward (augmentation included), backward, optimizer
step (Adam) and ``update_moving_average()`` -- for byol_wrapper and byol-pytorch on the same backbone, batch and
heads (Linear(4096)-BN-ReLU-Linear(256) projector and predictor, hidden layer ``avgpool``, tau 0.99).
byol-pytorch is built with ``use_simplicial_embeddings=False`` (its 0.9.1 default is ``True``, which adds a
Linear + BatchNorm + softmax block that byol_wrapper does not have), so both run the same network.

Augmentation is where the two libraries deliberately differ (byol_wrapper: the paper's two asymmetric views,
every parameter drawn per sample; byol-pytorch: one random draw for the whole batch, weaker ops), so the step
is measured under three augmentation settings (``--aug``):

* ``own``   -- each library's own default augmentation (what a user gets; *not* equal work);
* ``paper`` -- both learners use byol_wrapper's ``byol_views`` (byol-pytorch gets them as ``augment_fn`` /
  ``augment_fn2``): equal work;
* ``none``  -- identity augmentation in both: the learner machinery alone (backbone, heads, loss, optimizer,
  EMA, hooks); equal work.

byol_wrapper appears twice: ``concat_views=False`` (its default, as in the paper: each view passes through the
networks on its own, so BatchNorm normalises each view separately) and ``concat_views=True`` (both views in one
batch, byol-pytorch's behaviour). ``concat_views=True`` vs byol-pytorch is the like-for-like comparison; the
default does the same FLOPs in two half-size passes, which is slower on a GPU at small batches.

All configurations are built up front from the same initial weights and timed *interleaved* (one step of each in
turn), so slow drifts in machine load hit all of them alike; the reported figure is the median over ``--steps``
steps after ``--warmup`` steps (``torch.cuda.synchronize()`` around every step on CUDA).

Table 2 times one EMA update of a ResNet-50-sized parameter set (two torchvision ResNet-50s, 25.6 M parameters):
byol_wrapper's ``ema_update_`` (one ``torch._foreach_lerp_``), byol-pytorch's own ``update_moving_average``
(a Python loop assigning ``p.data = tau * p.data + (1 - tau) * p_o.data``, a new tensor per parameter), an
in-place Python loop ``p.mul_(tau).add_(p_o, alpha=1 - tau)``, and lightly's ``update_momentum`` (two foreach
calls) when lightly is installed.

Usage::

    python benchmarks/step_time.py                                  # CPU: ResNet-18, 32 px, batch 32
    python benchmarks/step_time.py --device cuda --backbone resnet50 --image-size 224 --batch-size 64
    python benchmarks/step_time.py --aug paper --steps 50 --threads 8
    python benchmarks/step_time.py --skip-ema                       # only table 1

Needs ``pip install byol-pytorch==0.9.1`` (and ``beartype``); lightly is optional.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import byol_wrapper  # noqa: E402
from _common import device_name, package_version, setup_torch  # noqa: E402
from byol_wrapper import BYOL, byol_views  # noqa: E402
from byol_wrapper.backbones import build_backbone  # noqa: E402
from byol_wrapper.engine import train_step  # noqa: E402
from byol_wrapper.momentum import ema_update_  # noqa: E402


# ------------------------------------------------------------------------------------------------ environment
def header(device: torch.device, title: str) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"### {title}",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
        f"- byol_wrapper {byol_wrapper.__version__}, byol-pytorch {package_version('byol-pytorch')}, "
        f"lightly {package_version('lightly')}",
        f"- torch threads: {torch.get_num_threads()} (intra-op); load average at start: {load}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
    ]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(args: argparse.Namespace) -> Callable[[], float]:
    """Wall clock, or with ``--timer cpu`` this process's CPU time (for a shared, loaded CPU machine)."""
    return time.process_time if args.timer == "cpu" else time.perf_counter


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------------ models
def make_backbone(name: str, cifar_stem: bool) -> nn.Module:
    """A torchvision classifier with ``fc`` replaced by ``nn.Identity`` (the heads replace it)."""
    try:
        net = build_backbone(name, cifar_stem=cifar_stem)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--backbone {name!r}{' --cifar-stem' if cifar_stem else ''}: {exc}") from None
    if hasattr(net, "fc"):
        net.fc = nn.Identity()
    return net


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def paper_views_as_functions(image_size: int) -> dict:
    """byol_wrapper's two views as plain functions for byol-pytorch's ``augment_fn`` / ``augment_fn2``.

    Plain functions, not the ``BYOLView`` modules themselves, so that byol-pytorch does not register them as its
    submodules (early byol_wrapper versions named the view's transform ``_apply``, shadowing ``nn.Module._apply``,
    so its constructor's ``self.to(device)`` raised). The views hold no parameters or buffers: nothing to move.
    """
    v1, v2 = byol_views(image_size)
    return dict(augment_fn=lambda x: v1(x), augment_fn2=lambda x: v2(x))


class Config:
    """One learner to time: a name, a ``step()`` closure and what it is compared with."""

    def __init__(self, aug: str, label: str, bn: str, step: Callable[[], None], ours: bool, peer: str | None):
        self.aug, self.label, self.bn, self.step, self.ours, self.peer = aug, label, bn, step, ours, peer
        self.times: list[float] = []


def make_step(learner: nn.Module, x: torch.Tensor, lr: float, ours: bool = True) -> Callable[[], None]:
    """One training step: byol_wrapper's shared step (:func:`byol_wrapper.engine.train_step`), or the same
    operations written out for byol-pytorch's learner."""
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=lr)
    if ours:
        return lambda: train_step(learner, opt, x) and None

    def step() -> None:
        loss = learner(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        learner.update_moving_average()

    return step


def build_configs(args: argparse.Namespace, device: torch.device, x: torch.Tensor) -> list[Config]:
    try:
        from byol_pytorch import BYOL as TheirBYOL
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f"byol-pytorch is needed: pip install byol-pytorch==0.9.1 beartype ({e})")

    torch.manual_seed(0)
    init = make_backbone(args.backbone, args.cifar_stem).state_dict()

    def backbone() -> nn.Module:
        net = make_backbone(args.backbone, args.cifar_stem)
        net.load_state_dict(init)
        return net.to(device)

    common = dict(hidden_layer="avgpool", projection_size=256, projection_hidden_size=4096, moving_average_decay=0.99)
    augs = ["own", "paper", "none"] if args.aug == "all" else [args.aug]
    configs = []
    for aug in augs:
        ours_kw: dict = {}
        theirs_kw: dict = {}
        if aug == "paper":
            theirs_kw = paper_views_as_functions(args.image_size)
        elif aug == "none":
            ours_kw = theirs_kw = dict(augment_fn=identity, augment_fn2=identity)
        theirs_name = "byol-pytorch"
        for concat in (False, True):
            # No .to(device) needed: the backbone is already there and the heads are built on its device.
            learner = BYOL(backbone(), args.image_size, concat_views=concat, **common, **ours_kw)
            label = "byol_wrapper" + (" concat_views=True" if concat else " (default)")
            bn = "one batch (2B)" if concat else "per view (B, B)"
            configs.append(Config(aug, label, bn, make_step(learner, x, args.lr), True, theirs_name))
        torch.manual_seed(0)
        theirs = TheirBYOL(backbone(), args.image_size, use_simplicial_embeddings=False, **common, **theirs_kw).to(device)
        configs.append(Config(aug, theirs_name, "one batch (2B)", make_step(theirs, x, args.lr, ours=False), False, None))
    return configs


AUG_TEXT = {
    "own": "each library's own default (not equal work)",
    "paper": "byol_wrapper's paper views in both (equal work)",
    "none": "identity in both (learner machinery only)",
}


def run_step_table(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.input_size, args.input_size, device=device)  # float images in [0, 1]
    configs = build_configs(args, device, x)
    print(f"building done: {len(configs)} configurations; warmup {args.warmup}, timed {args.steps} steps each", file=sys.stderr)
    clock = timer(args)

    def timed(c: Config, i: int) -> None:
        sync(device)
        t0 = clock()
        c.step()
        sync(device)
        if i >= args.warmup:
            c.times.append(clock() - t0)

    if args.sequential:
        for c in configs:
            for i in range(args.warmup + args.steps):
                timed(c, i)
    else:  # interleaved: one step of each configuration in turn
        for i in range(args.warmup + args.steps):
            for c in configs:
                timed(c, i)

    print(header(device, "Training step: byol_wrapper vs byol-pytorch 0.9.1"))
    print(
        f"- backbone: torchvision {args.backbone}{' (CIFAR stem)' if args.cifar_stem else ''}, fc removed, "
        f"hidden layer avgpool; heads 4096/256; image {args.image_size} px (input {args.input_size} px float32), "
        f"batch {args.batch_size}, Adam, tau 0.99"
    )
    print(
        f"- step = forward (augmentation included) + backward + optimizer step + EMA update; median of {args.steps} "
        f"steps after {args.warmup} warmup, configurations interleaved{' (no: sequential)' if args.sequential else ''}; "
        f"{'process CPU time' if args.timer == 'cpu' else 'wall clock'}"
    )
    print("- byol-pytorch: use_simplicial_embeddings=False (its default True adds an extra block)")
    print()
    print("| augmentation | learner | BatchNorm over views | ms/step (median) | p10-p90 ms | ours / byol-pytorch |")
    print("|---|---|---|---:|---:|---:|")
    by_aug: dict[str, dict[str, float]] = {}
    for c in configs:
        by_aug.setdefault(c.aug, {})[c.label] = statistics.median(c.times) * 1e3
    for c in configs:
        med = statistics.median(c.times) * 1e3
        spread = f"{percentile(c.times, 0.1) * 1e3:.1f}-{percentile(c.times, 0.9) * 1e3:.1f}"
        ratio = f"{med / by_aug[c.aug][c.peer]:.2f}" if c.ours and c.peer in by_aug[c.aug] else "1.00 (ref)"
        print(f"| {c.aug}: {AUG_TEXT[c.aug]} | {c.label} | {c.bn} | {med:.1f} | {spread} | {ratio} |")
    print()
    print("ours / byol-pytorch > 1 means byol_wrapper is slower. Like-for-like: `concat_views=True` rows with "
          "aug `paper` (same augmentation work) or `none` (no augmentation).")
    print()


# ------------------------------------------------------------------------------------------------ EMA
def loop_data_assign(target: nn.Module, online: nn.Module, tau: float) -> None:
    """byol-pytorch 0.9.1's ``update_moving_average`` body, verbatim (a new tensor per parameter)."""
    for current_params, ma_params in zip(online.parameters(), target.parameters()):
        old_weight, up_weight = ma_params.data, current_params.data
        ma_params.data = old_weight * tau + (1 - tau) * up_weight


@torch.no_grad()
def loop_inplace(target: nn.Module, online: nn.Module, tau: float) -> None:
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(tau).add_(p_o, alpha=1 - tau)


def run_ema_table(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    online = torchvision.models.resnet50(weights=None).to(device)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in online.parameters())
    n_tensors = len(list(online.parameters()))
    tau = 0.99

    methods: list[tuple[str, Callable[[], None]]] = [
        ("byol_wrapper `ema_update_` (one `_foreach_lerp_`), parameters only", lambda: ema_update_(target, online, tau, "none")),
        ("byol_wrapper `ema_update_`, parameters + BN buffers (learner default)", lambda: ema_update_(target, online, tau, "ema")),
    ]
    try:
        from byol_pytorch.byol_pytorch import EMA, update_moving_average

        ema = EMA(tau)
        methods.append(("byol-pytorch `update_moving_average` (loop, `p.data = tau*p + (1-tau)*o`)",
                        lambda: update_moving_average(ema, target, online)))
    except ImportError:
        methods.append(("byol-pytorch's loop, `p.data = tau*p + (1-tau)*o` (replica)", lambda: loop_data_assign(target, online, tau)))
    methods.append(("in-place loop `p.mul_(tau).add_(o, alpha=1-tau)`", lambda: loop_inplace(target, online, tau)))
    try:
        from lightly.models.utils import update_momentum

        methods.append(("lightly `update_momentum` (`_foreach_mul_` + `_foreach_add_`)", lambda: update_momentum(online, target, tau)))
    except ImportError:
        pass

    clock = timer(args)
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    for i in range(args.ema_warmup + args.ema_steps):
        for name, fn in methods:  # interleaved, like table 1
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            if i >= args.ema_warmup:
                times[name].append(clock() - t0)

    print(header(device, "EMA target update, ResNet-50-sized parameter set"))
    print(f"- two torchvision resnet50: {n_params / 1e6:.2f} M parameters in {n_tensors} tensors (float32), tau {tau}; "
          f"median of {args.ema_steps} updates after {args.ema_warmup} warmup; "
          f"{'process CPU time' if args.timer == 'cpu' else 'wall clock'}")
    print()
    print("| method | ms / update (median) | p10-p90 ms | time / `ema_update_` params only (= its speed-up) |")
    print("|---|---:|---:|---:|")
    ref = statistics.median(times[methods[0][0]])
    for name, _ in methods:
        med = statistics.median(times[name])
        spread = f"{percentile(times[name], 0.1) * 1e3:.2f}-{percentile(times[name], 0.9) * 1e3:.2f}"
        print(f"| {name} | {med * 1e3:.2f} | {spread} | {med / ref:.2f}x |")
    print()


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18", help="torchvision.models constructor name (default resnet18)")
    p.add_argument("--image-size", type=int, default=32, help="augmentation output size (default 32)")
    p.add_argument("--input-size", type=int, default=None, help="side of the input images (default: --image-size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 10 CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 conv1, no maxpool (CIFAR ResNet)")
    p.add_argument("--aug", choices=["all", "own", "paper", "none"], default="all", help="augmentation setting(s), see above")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock (default), or process CPU time: steadier on a shared, loaded CPU machine; use it with "
                   "--threads 1 (idle OpenMP threads spin and count as CPU time); CPU device only")
    p.add_argument("--sequential", action="store_true", help="time configurations one after another, not interleaved")
    p.add_argument("--skip-step", action="store_true", help="skip table 1")
    p.add_argument("--skip-ema", action="store_true", help="skip table 2")
    p.add_argument("--ema-steps", type=int, default=None, help="timed EMA updates (default 20 CPU, 100 CUDA)")
    p.add_argument("--ema-warmup", type=int, default=None, help="untimed EMA updates (default 3 CPU, 10 CUDA)")
    args = p.parse_args(argv)

    device = setup_torch(args.device, args.threads)
    cuda = device.type == "cuda"
    if args.timer == "cpu" and cuda:
        raise SystemExit("--timer cpu measures host CPU time; use the default wall clock on CUDA")
    args.input_size = args.input_size or args.image_size
    args.steps = args.steps or (50 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    args.ema_steps = args.ema_steps or (100 if cuda else 20)
    args.ema_warmup = args.ema_warmup if args.ema_warmup is not None else (10 if cuda else 3)

    if not args.skip_step:
        run_step_table(args, device)
    if not args.skip_ema:
        run_ema_table(args, device)


if __name__ == "__main__":
    main()
