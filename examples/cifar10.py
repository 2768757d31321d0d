"""BYOL pretraining of a CIFAR ResNet-18 on CIFAR-10, with kNN and linear-probe evaluation.

The backbone is torchvision's ResNet-18 with the usual CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) and
``fc = Identity``, so its output is the 512-d pooled feature (``hidden_layer=-1``).

Data: an ImageFolder tree ``DATA/train/<class>/*`` and ``DATA/test/<class>/*`` (the CIFAR-10 JPEG folder, or
any small labelled image folder). Both splits are decoded **once** into uint8 tensors ``(N, 3, S, S)`` and
cached in ``--cache`` (default ``/tmp``; the file name is a hash of the paths, sizes and modification times of
the images, so a changed folder is re-read). Training batches are random index slices of that tensor moved to
the device (on CUDA the whole tensor lives on the GPU); there is no per-image work per step, since the BYOL
augmentations run per sample inside the learner, on the device.

Recipe (solo-learn's BYOL CIFAR-10 settings, scaled to short runs):

* LARS (``byol_wrapper.optim``), lr ``1.0 * batch / 256``, weight decay 1e-5, trust coefficient 0.02, biases
  and BatchNorm parameters excluded from decay and adaptation; SGD/AdamW with ``--optimizer``.
* Linear warmup for ``--warmup-epochs`` (at most 10% of training), then cosine decay to 0, per step.
* tau: cosine from ``--tau`` = 0.99 to 1 over the run (``total_steps`` is passed to ``BYOL``). The paper's
  0.996 goes with 1000 epochs at batch 4096; for short runs and small batches (CIFAR, a few thousand steps)
  0.99 lets the target follow the online network faster (solo-learn's CIFAR setting).
* Views: the paper's, minus Gaussian blur (``blur_p=0``: SimCLR and solo-learn drop blur on 32 px CIFAR
  images); ``--blur`` restores it.

Evaluation (on the online backbone, ImageNet normalisation as in ``learner(x, return_embedding=True)``):
weighted kNN (k=200, T=0.1) of the random-init backbone before training, every ``--eval-every`` epochs and at
the end, using ``--knn-train-subset`` train images (default all 50k) as the memory bank and the test split
(``--knn-test-subset``, default all 10k); a linear probe (``--probe-epochs`` on the same cached features) before
and after. The time budget counts training steps only (not the evaluations).

Outputs in ``--out``: ``backbone.pt`` (the ResNet's plain ``state_dict``, loadable by ``examples/finetune.py``)
and ``results.json`` (all figures, loss history and the arguments).

Usage::

    mkdir -p /tmp/cifar10 && tar -xzf cifar10-jpg.tar.gz -C /tmp/cifar10
    python examples/cifar10.py --data /tmp/cifar10 --epochs 200                  # GPU: the full recipe
    python examples/cifar10.py --data /tmp/cifar10 --time-budget-min 30          # stop (and fit the schedule) at 30 min
    python examples/cifar10.py --data /tmp/cifar10 --device cpu --threads 1 --channels-last --precision bf16 \\
        --time-budget-min 2 --batch-size 32 --optimizer sgd --lr 0.4 --knn-train-subset 10000 --probe-epochs 20

Short CPU runs: in its first few hundred steps BYOL lowers the kNN accuracy of the random-init backbone before
raising it. Measured with the last command on 2 shared cores (about 30 images/s): 2 minutes (100 steps) moved
kNN 30.9% -> 31.8% and the linear probe 37.8% -> 35.8% (noise level); with ``--time-budget-min 25`` (the
fitted schedule ended after 21 minutes, 1178 steps, 0.75 epoch) kNN went 30.9% -> 32.7% and the linear probe
37.8% -> 43.1%. The reference recipe (LARS, batch 256, hundreds of epochs) is for a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

try:
    import byol_wrapper  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from byol_wrapper import BYOL
from byol_wrapper.data import LabelledImageFolder, collate_pairs
from byol_wrapper.evaluate import (
    collapse_stats,
    extract_features,
    knn_accuracy,
    linear_probe,
)
from byol_wrapper.backbones import build_backbone
from byol_wrapper.engine import Schedule, autocast, grad_scaler, resolve_device, resolve_precision, train_step
from byol_wrapper.optim import OPTIMIZERS, build_optimizer

CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ data
def _folder_digest(*datasets: LabelledImageFolder, image_size: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{image_size}".encode())
    for ds in datasets:
        h.update(f"|{ds.root.resolve()}|{','.join(ds.classes)}".encode())
        for path, label in zip(ds.files, ds.labels):
            st = path.stat()
            h.update(f"|{path.relative_to(ds.root)}:{st.st_size}:{st.st_mtime_ns}:{label}".encode())
    return h.hexdigest()[:16]


def _decode(ds: LabelledImageFolder, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes every image of ``ds`` into one uint8 tensor (unreadable files are skipped with a warning)."""
    loader = DataLoader(ds, batch_size=500, num_workers=workers, collate_fn=collate_pairs)
    images, labels = zip(*loader)
    images = torch.cat([b for b in images if b.numel()])
    return images.contiguous(), torch.cat(labels)


def load_image_folder(root: str | os.PathLike[str], image_size: int = 32, cache_dir: str | None = "/tmp",
                      workers: int = 0) -> dict:
    """``{"train_x", "train_y", "test_x", "test_y", "classes"}`` of ``root/train`` and ``root/test``, uint8.

    Images are resized (shorter side) and centre-cropped to ``image_size``. The tensors are cached as one
    ``.pt`` file in ``cache_dir`` (``None``: no cache), keyed by a hash of the files, so later runs load them
    in a second.
    """
    root = Path(root).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise SystemExit(f"--data {str(root)!r} must contain train/ and test/ ImageFolder splits; {split}/ is missing")
    train = LabelledImageFolder(root / "train", image_size)
    test = LabelledImageFolder(root / "test", image_size, classes=train.classes)
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser() / f"byol-imagefolder-{_folder_digest(train, test, image_size=image_size)}.pt"
        if cache.is_file():
            t = time.perf_counter()
            data = torch.load(cache, map_location="cpu", weights_only=True)
            print(f"data: loaded cache {cache} ({time.perf_counter() - t:.1f} s)")
            return data
    t = time.perf_counter()
    train_x, train_y = _decode(train, workers)
    test_x, test_y = _decode(test, workers)
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": list(train.classes)}
    print(f"data: decoded {len(train_x)} train + {len(test_x)} test images in {time.perf_counter() - t:.1f} s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, cache)  # atomic: a concurrent or interrupted run never sees half a file
        print(f"data: cached in {cache}")
    return data


def subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` samples (all of them if ``n`` is 0 or too large)."""
    if n <= 0 or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


# ------------------------------------------------------------------------------------------------ model
def cifar_resnet18() -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 conv1, no max-pool; ``fc`` removed (512-d output)."""
    net = build_backbone("resnet18", cifar_stem=True)
    net.fc = nn.Identity()
    return net


class Embedder(nn.Module):
    """images -> the learner's online embedding (normalised input, no projection), for the evaluators."""

    def __init__(self, learner: BYOL, autocast) -> None:
        super().__init__()
        self.learner, self.autocast = learner, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.learner(x, return_embedding=True, return_projection=False).float()


# ------------------------------------------------------------------------------------------------ helpers
def fmt_time(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train/<class>/* and test/<class>/*")
    p.add_argument("--out", default="runs/cifar10-byol", help="output folder: backbone.pt and results.json")
    p.add_argument("--cache", default="/tmp", help="folder for the decoded uint8 tensor cache ('none' to disable)")
    p.add_argument("--image-size", type=int, default=32)
    g = p.add_argument_group("length (schedules follow --epochs, else the time budget; 200 epochs if neither is given)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--time-budget-min", type=float, default=None, help="stop training after this many minutes of training steps")
    g.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (smoke tests)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 128 on CPU")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="lars")
    g.add_argument("--lr", type=float, default=None, help="peak lr per 256 images (scaled by batch/256); default: 1.0 LARS, 0.06 SGD, 2e-3 AdamW")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 1e-5 LARS, 5e-4 SGD, 1e-6 AdamW")
    g.add_argument("--trust-coefficient", type=float, default=0.02, help="LARS eta")
    g.add_argument("--warmup-epochs", type=float, default=10.0, help="linear warmup length, at most 10%% of training")
    g.add_argument("--tau", type=float, default=0.99, help="base EMA decay; cosine to 1 over the run")
    g.add_argument("--blur", action="store_true", help="keep the paper's Gaussian blur (off by default at 32 px)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0, help="kNN every N epochs (0: only before and after)")
    g.add_argument("--knn-train-subset", type=int, default=0, help="kNN memory bank size (0: all train images)")
    g.add_argument("--knn-test-subset", type=int, default=0, help="test images evaluated (0: all)")
    g.add_argument("--knn-k", type=int, default=200)
    g.add_argument("--knn-t", type=float, default=0.1)
    g.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs on cached features (0: skip)")
    g.add_argument("--eval-batch-size", type=int, default=512)
    g = p.add_argument_group("performance")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes (first run only)")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch CPU threads; on a machine shared with other jobs, 1 can be several times faster")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto: bf16 on CUDA if supported, else fp32")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPUs, and on CPUs via oneDNN)")
    g.add_argument("--compile", action="store_true", help="torch.compile the learner's training forward (minutes of compilation)")
    g.add_argument("--log-every", type=int, default=50, help="log every N steps (and at least every 30 s)")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("epochs", "max_steps", "batch_size", "image_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        p.error("--time-budget-min must be positive")
    if args.epochs is None and args.time_budget_min is None:
        args.epochs = 200
    return args


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch_size = args.batch_size or (256 if device.type == "cuda" else 128)
    defaults = {"lars": (1.0, 1e-5), "sgd": (0.06, 5e-4), "adamw": (2e-3, 1e-6)}[args.optimizer]
    base_lr = args.lr if args.lr is not None else defaults[0]
    weight_decay = args.weight_decay if args.weight_decay is not None else defaults[1]
    peak_lr = base_lr * batch_size / 256
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Data: decoded once, cached; training batches are index slices of one uint8 tensor on the device.
    data = load_image_folder(args.data, args.image_size, None if args.cache.lower() == "none" else args.cache, args.workers)
    train_x = data["train_x"]
    n_train = len(train_x)
    if n_train < max(2, batch_size):
        raise SystemExit(f"batch size {batch_size} is larger than the {n_train} training images; pass a smaller --batch-size")
    if device.type == "cuda":
        train_x = train_x.to(device)
    knn_train = subset(data["train_x"], data["train_y"], args.knn_train_subset, args.seed)
    knn_test = subset(data["test_x"], data["test_y"], args.knn_test_subset, args.seed + 1)
    knn_train = (knn_train[0].to(device), knn_train[1])
    knn_test = (knn_test[0].to(device), knn_test[1])
    num_classes = len(data["classes"])

    # Length of training, in optimizer steps.
    steps_per_epoch = n_train // batch_size  # last partial batch dropped
    step_cap = args.epochs * steps_per_epoch if args.epochs else None
    if args.max_steps:
        step_cap = min(step_cap, args.max_steps) if step_cap else args.max_steps
    budget_s = args.time_budget_min * 60 if args.time_budget_min else None
    # With a time budget and no step cap, the schedule length is estimated from the measured step time
    # (re-estimated during the first half of the budget, then frozen); until then a provisional length is used.
    total_steps = step_cap or max(10 * steps_per_epoch, 100)

    def warmup_steps(total: int) -> int:
        return min(int(args.warmup_epochs * steps_per_epoch), total // 10)

    # Model (seeded here: decoding the data with DataLoader workers draws from the global RNG on a cache miss).
    torch.manual_seed(args.seed)
    resnet = cifar_resnet18()
    augment_kwargs = None if args.blur else {"blur_p": 0.0}
    learner = BYOL(resnet, image_size=args.image_size, hidden_layer=-1, moving_average_decay=args.tau,
                   total_steps=total_steps, augment_kwargs=augment_kwargs)
    # Channels-last weights make the learner feed channels-last views to the backbone (faster convolutions on
    # recent GPUs, and with oneDNN on CPUs).
    learner = learner.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    model = torch.compile(learner) if args.compile else learner  # the whole learner, augmentations included
    opt = build_optimizer(args.optimizer, learner, lr=peak_lr, weight_decay=weight_decay, trust_coefficient=args.trust_coefficient)
    scaler = grad_scaler(device) if precision == "fp16" else None
    embedder = Embedder(learner, lambda: autocast(device, precision))
    schedule = Schedule(total_steps, peak_lr, warmup_steps(total_steps), base_tau=args.tau)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'CPU'}), "
          f"{torch.get_num_threads()} threads, precision {precision}, channels_last {args.channels_last}, compile {args.compile}")
    print(f"train {n_train} images, batch {batch_size}, {steps_per_epoch} steps/epoch; "
          + (f"schedule fitted to a {args.time_budget_min:g} min budget" if budget_s else "")
          + (", " if budget_s and step_cap else "")
          + (f"{'at most ' if budget_s else ''}{step_cap} steps ({step_cap / steps_per_epoch:.2f} epochs)" if step_cap else ""))
    print(f"{args.optimizer} peak lr {peak_lr:g} (= {base_lr:g} x {batch_size}/256), wd {weight_decay:g}, tau {args.tau} -> 1, "
          f"blur {'on' if args.blur else 'off'}; kNN bank {len(knn_train[1])}, test {len(knn_test[1])}")

    history: list[dict] = []

    def evaluate(tag: str, epoch: float, probe: bool) -> dict:
        t = time.perf_counter()
        ftr = extract_features(embedder, knn_train, batch_size=args.eval_batch_size, device=device)
        fte = extract_features(embedder, knn_test, batch_size=args.eval_batch_size, device=device)
        res = {"tag": tag, "epoch": round(epoch, 3), "step": learner.step,
               "knn_top1": knn_accuracy(None, ftr, fte, k=args.knn_k, temperature=args.knn_t, num_classes=num_classes)}
        res["std_ratio"] = collapse_stats(fte[0])["std_ratio"]
        if probe and args.probe_epochs > 0:
            lp = linear_probe(None, ftr, fte, epochs=args.probe_epochs, num_classes=num_classes, device=device, seed=args.seed)
            res["probe_top1"] = lp["test_accuracy"]
        res["eval_s"] = round(time.perf_counter() - t, 1)
        history.append(res)
        print(f"[eval {tag}] epoch {epoch:.2f} step {learner.step}: kNN top-1 {100 * res['knn_top1']:.2f}%"
              + (f", linear probe {100 * res['probe_top1']:.2f}%" if "probe_top1" in res else "")
              + f", embedding std ratio {res['std_ratio']:.2f} ({res['eval_s']:.0f} s)", flush=True)
        return res

    before = evaluate("before", 0.0, probe=True)

    # Training.
    learner.train()
    losses: list[dict] = []
    step, train_s, last_log = 0, 0.0, time.perf_counter()
    first_step_s = 0.0
    loss_sum, loss_n = torch.zeros((), device=device), 0
    done, stop_reason = False, "schedule complete"
    epoch = 0
    while not done:
        perm = torch.randperm(n_train, device=train_x.device)
        for i in range(steps_per_epoch):
            t0 = time.perf_counter()
            images = train_x[perm[i * batch_size:(i + 1) * batch_size]].to(device, non_blocking=True)
            result = train_step(learner, opt, images, schedule=schedule, model=model, precision=precision, scaler=scaler)
            lr = result.lr
            loss_sum += result.loss
            loss_n += 1
            step += 1
            log_now = step % args.log_every == 0 or time.perf_counter() - last_log > 30 or step == total_steps
            if device.type == "cuda" and (log_now or budget_s):
                torch.cuda.synchronize(device)  # honest step times (every step only when a budget is set)
            dt = time.perf_counter() - t0
            train_s += dt
            if step == 1:
                first_step_s = dt

            # Fit the schedules to the time budget: steps = done + time left / mean step time (the first step,
            # with its one-off set-up, excluded; the mean over all later steps is stable under load swings),
            # re-estimated during the first half of the budget, then frozen; --epochs / --max-steps stay caps.
            if budget_s and train_s < budget_s / 2 and step >= 2:
                mean_step = (train_s - first_step_s) / (step - 1)
                est = step + int((budget_s - train_s) / mean_step)
                total_steps = max(min(est, step_cap or est), step + 1)
                schedule.total_steps, schedule.warmup_steps = total_steps, warmup_steps(total_steps)
            if log_now:
                mean_loss = (loss_sum / loss_n).item()
                if not math.isfinite(mean_loss):
                    raise SystemExit(f"loss is not finite at step {step}; lower --lr")
                losses.append({"step": step, "loss": round(mean_loss, 5), "lr": lr, "tau": learner.tau})
                print(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f}: loss {mean_loss:.4f} lr {lr:.4g} "
                      f"tau {learner.tau:.5f} | {step * batch_size / train_s:.1f} img/s, train {fmt_time(train_s)}", flush=True)
                loss_sum.zero_()
                loss_n, last_log = 0, time.perf_counter()
            if step >= total_steps:
                done = True
            elif budget_s and train_s >= budget_s:
                done, stop_reason = True, f"time budget reached ({args.time_budget_min:g} min)"
            if done:
                break
        epoch += 1
        if not done and args.eval_every and epoch % args.eval_every == 0:
            evaluate(f"epoch {epoch}", epoch, probe=False)
            learner.train()

    epochs_done = step / steps_per_epoch
    after = evaluate("after", epochs_done, probe=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in resnet.state_dict().items()}, out / "backbone.pt")

    images_per_s = step * batch_size / train_s
    wall_s = time.perf_counter() - start
    results = {
        "knn_top1_before": before["knn_top1"], "knn_top1_after": after["knn_top1"],
        "probe_top1_before": before.get("probe_top1"), "probe_top1_after": after.get("probe_top1"),
        "steps": step, "scheduled_steps": total_steps, "epochs": round(epochs_done, 4), "stop_reason": stop_reason,
        "train_seconds": round(train_s, 2), "wall_seconds": round(wall_s, 1), "images_per_second": round(images_per_s, 2),
        "seconds_per_step": round(train_s / max(step, 1), 4), "first_step_seconds": round(first_step_s, 3),
        "final_tau": learner.tau,
        "batch_size": batch_size, "peak_lr": peak_lr, "weight_decay": weight_decay, "precision": precision,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "knn_train_size": len(knn_train[1]),
        "knn_test_size": len(knn_test[1]), "evals": history, "losses": losses, "args": vars(args),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    rows = [(f"kNN top-1 (k={args.knn_k}, T={args.knn_t:g})", pct(before["knn_top1"]), pct(after["knn_top1"])),
            (f"linear probe top-1 ({args.probe_epochs} ep)", pct(before.get("probe_top1")), pct(after.get("probe_top1")))]
    print("\n| metric | random init | after BYOL |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"\n{step} steps ({epochs_done:.2f} epochs, {stop_reason}), batch {batch_size}, train time {fmt_time(train_s)}, "
          f"{images_per_s:.1f} images/s ({train_s / max(step, 1):.2f} s/step) on {results['device_name']}; "
          f"wall time {fmt_time(wall_s)} with data loading and evaluation")
    print(f"kNN bank {len(knn_train[1])} train images, {len(knn_test[1])} test images")
    print(f"wrote {out / 'backbone.pt'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
