"""One ``byol-train`` run: build (data, model, optimizer), restore a checkpoint, train, evaluate, save and export."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._extras import missing_train_extras
from .._version import __version__
from ..backbones import build_backbone
from ..byol import BYOL
from ..checkpoint import atomic_save, load_latest_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state
from ..checkpoint import CheckpointUnreadableError, ForeignCheckpointError, nonfinite_entries, set_aside
from ..data import EpochSampler, ImageFolderDataset, LabelledImageFolder, collate_pairs, collate_skip_none
from ..decode import FastDecode
from ..engine import Schedule, train_step
from ..optim import build_optimizer
from .args import PROG, UsageError
from .metrics import plot_metrics, progress_bar, read_metrics, truncate_metrics
from .plan import default_load_size, make_plan
from .runtime import EXIT_DIVERGED, Diverged, OutputError, Ranks, autocast, grad_scaler, graceful_stop, ignore_stop_signals
from .runtime import one_line_warnings, out_problem, resolve_precision, seed_everything, select_device

__all__ = ["MODEL_KEYS", "Trainer"]

MODEL_KEYS = (
    "backbone",
    "backbone_kwargs",
    "cifar_stem",
    "channels",
    "hidden_layer",
    "projection_size",
    "projection_hidden_size",
    "image_size",
    "optimizer",
)
"""Settings that must match the checkpoint when resuming (they change the model or the optimizer state)."""

_EVAL_CACHE_BYTES = 2 * 1024**3
_PLOT_INTERVAL_S = 60.0


class _NoEvalData(RuntimeError):
    """No readable image in an evaluation split."""


class _Embedder(nn.Module):
    """Images in [0, 1] -> the learner's normalised representation (what the kNN monitor sees)."""

    def __init__(self, learner: BYOL) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.learner(x, return_embedding=True, return_projection=False)


class Trainer:
    """Holds the state of one ``byol-train`` invocation."""

    def __init__(self, args: argparse.Namespace, ranks: Ranks | None = None, device: torch.device | None = None) -> None:
        self.args = args
        self.out = Path(args.out).expanduser()
        self.ranks = ranks or Ranks()
        self.device = device if device is not None else select_device(args.device)
        self.precision = resolve_precision(args.precision, self.device)
        self.image_size = args.image_size
        self._check_args()
        self._build_data()  # scanned now, so that a missing or empty folder fails before anything starts
        self.config = self._config()
        self.ckpt_path = self.out / "last.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        set_aside_before = self._set_aside_files()
        checkpoint, source = self._read_checkpoint()
        if checkpoint is not None:
            self._check_compatible(checkpoint.get("config", {}), source)
        else:
            seed_everything(args.seed)  # the same on every rank: identical initial weights
        self._build_model()
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_total = 0
        self.elapsed_before = 0.0
        self.resumed_from: Path | None = None
        self.good_step: int | None = None  # step of the checkpoint on disk (always finite)
        if checkpoint is not None:
            self._restore(checkpoint)
            self.resumed_from = source
            self.good_step = self.step
        else:
            self._start_fresh(set_aside_before)
        self._build_loader()
        self._eval_cache: dict[str, Any] = {}
        self._write_config()

    @property
    def step(self) -> int:
        """Optimizer steps done: the learner's counter (saved in its state_dict), which drives lr and tau."""
        return self.learner.step

    # ------------------------------------------------------------------ setup steps
    def _check_args(self) -> None:
        """Checks that only make sense together (argparse checked each flag alone)."""
        args = self.args
        if args.data is None:
            raise UsageError("--data DIR is required (a folder of images), or use --demo")
        if not math.isfinite(args.knn_temperature) or args.knn_temperature <= 0:
            raise UsageError(f"--knn-temperature must be > 0, got {args.knn_temperature}")
        if not 0.0 <= args.moving_average_decay <= 1.0:
            raise UsageError(f"--moving-average-decay must be in [0, 1] (e.g. 0.99 or the paper's 0.996), got {args.moving_average_decay}")
        if args.channels is not None and args.cache is not None:
            raise UsageError("--cache holds 8-bit RGB images and cannot be used with --channels (full-precision "
                             "decoding); drop --cache, or drop --channels for 8-bit RGB data")

    def _build_data(self) -> None:
        """The training set, the plan (steps, warmup, lr, weight decay) it implies, and the evaluation splits."""
        args = self.args
        load_size = args.load_size or default_load_size(args.image_size)
        if load_size < args.image_size:
            warnings.warn(
                f"--load-size {load_size} is smaller than --image-size {args.image_size}: views are upsampled",
                RuntimeWarning,
                stacklevel=3,
            )
        try:
            self.dataset = ImageFolderDataset(args.data, load_size, channels=args.channels)
        except ValueError as exc:
            raise UsageError(f"--data: {exc}") from exc
        if args.channels is None:  # --channels decodes at full precision with byol_wrapper.image_io instead
            self.dataset = FastDecode(self.dataset)  # the fastest decoder per format (byol_wrapper.decode)
        self.plan = make_plan(args, len(self.dataset), self.ranks.world)
        self.load_size = self.plan.load_size
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.rank_batch = self.plan.rank_batch
        self.total_steps = self.plan.total_steps
        self.warmup_steps = self.plan.warmup_steps
        self.base_lr = self.plan.base_lr
        self.weight_decay = self.plan.weight_decay
        self.eval_sets: tuple[Any, Any] | None = None
        if args.eval_data is not None:
            root = Path(args.eval_data).expanduser()
            try:
                train = LabelledImageFolder(root / "train", self.image_size, channels=args.channels)
                test = LabelledImageFolder(root / "test", self.image_size, classes=train.classes, channels=args.channels)
            except ValueError as exc:
                raise UsageError(f"--eval-data must hold train/<class>/* and test/<class>/* image folders: {exc}") from exc
            self.eval_sets = (train, test)

    def _read_checkpoint(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The newest good checkpoint in ``--out`` (rank 0 first: it sets a corrupt one aside before the others read)."""
        refused: str | None = None
        checkpoint: dict[str, Any] | None = None
        source: Path | None = None
        if self.ranks.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise UsageError(f"--out {self.out} (or a folder above it) is a file, not a folder; pass a folder path") from None
            except OSError as exc:
                raise UsageError(out_problem(self.out, exc)) from exc
            remove_stale_temporaries(self.out)
            try:
                checkpoint, source = load_latest_checkpoint(self.ckpt_path, map_location="cpu")
            except CheckpointUnreadableError as exc:
                refused = f"{exc}; fix the file's permissions or the disk and re-run: nothing was changed in {self.out}"
            except ForeignCheckpointError as exc:
                refused = f"{exc}. Move it out of {self.out} or use another --out: byol-train will not train over it"
        if self.ranks.sum(int(refused is not None))[0]:  # also the barrier: every rank refuses with rank 0
            raise UsageError(refused or "rank 0 cannot use the checkpoint in --out (see its message)")
        if not self.ranks.main:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 already warned
                checkpoint, source = load_latest_checkpoint(self.ckpt_path, map_location="cpu")
        return checkpoint, source

    def _build_model(self) -> None:
        """The backbone, the learner, the optimizer, the loss scaler and the model the steps run (DDP, compiled)."""
        args = self.args
        try:
            backbone = build_backbone(
                args.backbone,
                cifar_stem=args.cifar_stem,
                channels=args.channels,
                pretrained=not args.no_pretrained,
                **args.backbone_kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--backbone {args.backbone} (--backbone-kwargs {json.dumps(args.backbone_kwargs)}): {exc}") from exc
        backbone = backbone.to(self.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        try:
            self.learner = BYOL(
                backbone,
                self.image_size,
                hidden_layer=args.hidden_layer,
                projection_size=args.projection_size,
                projection_hidden_size=args.projection_hidden_size,
                moving_average_decay=args.moving_average_decay,
                total_steps=self.total_steps,
                augment_kwargs=args.augment_kwargs,
                channels=args.channels,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"cannot build the BYOL learner (--backbone {args.backbone}, --hidden-layer {args.hidden_layer}, "
                f"--augment-kwargs {json.dumps(args.augment_kwargs)}): {exc}"
            ) from exc
        self.optimizer = build_optimizer(
            args.optimizer,
            self.learner,
            lr=self.base_lr,
            weight_decay=self.weight_decay,
            momentum=args.momentum,
            trust_coefficient=args.trust_coefficient,
        )
        # lr and tau side by side, both read from the learner's step counter (byol_wrapper.engine)
        self.schedule = Schedule(self.total_steps, self.base_lr, self.warmup_steps, args.final_lr, args.moving_average_decay)
        self.scaler = grad_scaler(self.device) if self.precision == "fp16" else None
        self.model: nn.Module = self.learner
        if self.ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Reads the learner's _ddp_params_and_buffers_to_ignore: no find_unused_parameters needed.
            self.model = DistributedDataParallel(self.learner, device_ids=[self.device] if self.device.type == "cuda" else None)
        if args.compile:
            # The whole forward in one graph (DDP-wrapped: compiled around DDP, as PyTorch recommends). The EMA
            # update stays eager; checkpoints and exports read the plain learner, so their keys do not change.
            self.model = torch.compile(self.model)

    def _start_fresh(self, set_aside_before: set[str]) -> None:
        """No checkpoint: keep an earlier log aside (never deleted) and give each rank its own augmentations."""
        if self.ranks.main and self.metrics_path.exists():
            # The history of the lost run is kept aside, never deleted (checkpoints set aside as corrupt, or
            # deleted by the user, may still be wanted with it).
            new_aside = self._set_aside_files() - set_aside_before
            kept = set_aside(self.metrics_path, "old")
            warnings.warn(
                f"starting from step 0: the earlier log {self.metrics_path.name} was kept as {kept.name}"
                + (f" (with {', '.join(sorted(new_aside))})" if new_aside else ""),
                RuntimeWarning,
                stacklevel=3,
            )
        if self.ranks.world > 1:  # same weights everywhere, but each rank draws its own augmentations
            seed_everything(self.args.seed + self.ranks.rank)

    def _build_loader(self) -> None:
        """The epoch sampler and the training DataLoader (or the --cache / --decode fast loader, same batches)."""
        args = self.args
        self.sampler = EpochSampler(len(self.dataset), seed=args.seed, num_replicas=self.ranks.world, rank=self.ranks.rank)
        loader_gen = torch.Generator()
        loader_gen.manual_seed(args.seed + self.ranks.rank)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.rank_batch,
            sampler=self.sampler,
            num_workers=args.workers,
            collate_fn=collate_skip_none,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=args.workers > 0,
            generator=loader_gen,  # keeps the global RNG (augmentations) independent of loader creation
            worker_init_fn=ignore_stop_signals,
        )
        self.decode = "cpu"
        self._setup_fast_data()  # --cache / --decode: replaces self.loader (same sampler, same batches)

    def _write_config(self) -> None:
        if self.ranks.main:
            try:
                with open(self.out / "config.json", "w", encoding="utf-8") as f:
                    json.dump(self.config, f, indent=2)
            except OSError as exc:
                raise UsageError(out_problem(self.out, exc)) from exc

    # ------------------------------------------------------------------ setup helpers
    def _set_aside_files(self) -> set[str]:
        """Names of the checkpoints set aside as corrupt in ``--out``."""
        try:
            return {p.name for p in self.out.glob("last*.corrupt*")}
        except OSError:
            return set()

    def _setup_fast_data(self) -> None:
        from ..pipeline import fast_loader

        if self.args.channels is not None:  # full-precision decoding on the CPU (checked against --cache above)
            if self.args.decode == "gpu":
                self._say_now("info: --decode gpu decodes 8-bit RGB JPEGs only; --channels decodes on the CPU")
            return

        ordered = self.args.cache is not None and self.ranks.world > 1  # rank 0 builds (and reports) first
        if ordered and not self.ranks.main:
            self.ranks.barrier()
        try:
            self.loader, self.decode = fast_loader(self, self.args, self.dataset, self.sampler, self.loader, self._say_now)
        except ValueError as exc:
            raise UsageError(f"--cache: {exc}") from exc
        finally:
            if ordered and self.ranks.main:
                self.ranks.barrier()  # also on an error: the others then fail the same way instead of waiting

    def _say_now(self, msg: str) -> None:
        if self.ranks.main:
            print(msg, file=sys.stderr)

    def _config(self) -> dict[str, Any]:
        a = self.args
        return {
            "version": __version__,
            "data": str(a.data),
            "eval_data": None if a.eval_data is None else str(a.eval_data),
            "backbone": a.backbone,
            "backbone_kwargs": a.backbone_kwargs,
            "cifar_stem": bool(a.cifar_stem),
            "channels": a.channels,
            "hidden_layer": a.hidden_layer,
            "projection_size": a.projection_size,
            "projection_hidden_size": a.projection_hidden_size,
            "moving_average_decay": a.moving_average_decay,
            "augment_kwargs": a.augment_kwargs,
            "image_size": a.image_size,
            "load_size": self.load_size,
            "batch_size": a.batch_size,
            "epochs": a.epochs,
            "max_steps": a.max_steps,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_steps": self.warmup_steps,
            "optimizer": a.optimizer,
            "lr": self.base_lr,
            "final_lr": a.final_lr,
            "weight_decay": self.weight_decay,
            "momentum": a.momentum,
            "trust_coefficient": a.trust_coefficient,
            "precision": self.precision,
            "channels_last": bool(a.channels_last),
            "compile": bool(a.compile),
            "seed": a.seed,
            "device": str(self.device),
            "world_size": self.ranks.world,
        }

    def _check_compatible(self, saved: dict[str, Any], source: Path | None) -> None:
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {self.config[k]!r}" for k in MODEL_KEYS if saved.get(k) != self.config[k]]
        if diffs:
            flags = ", ".join("--" + d.split(":")[0].replace("_", "-") for d in diffs)
            raise UsageError(
                f"the checkpoint {source} was trained with different model settings ({'; '.join(diffs)}). "
                f"Resume with the same {flags}, or start a new run with a different --out"
            )

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.learner.load_state_dict(ckpt["learner"])
        except RuntimeError as exc:
            raise UsageError(f"the checkpoint in {self.out} does not fit the model built from these flags: {exc}") from exc
        # The schedules follow this command's length and base tau (a longer --max-steps extends training), from
        # the restored step: the learner's counter, the one both schedules read.
        self.schedule.apply_to(self.learner)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)  # hyper-parameters from this command, state (momentum) from the checkpoint
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if int(ckpt["step"]) != self.learner.step:  # the one counter is the learner's; the file's copy wins
            self.learner.set_extra_state({**self.learner.get_extra_state(), "step": int(ckpt["step"])})
        self.epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        if self.batch_in_epoch >= self.steps_per_epoch:  # the data set shrank since the checkpoint
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.skipped_total = int(ckpt.get("skipped_images", 0))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        saved = ckpt.get("config", {})
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(per_rank) == self.ranks.world:
            set_rng_state(per_rank[self.ranks.rank])
        else:  # another number of processes: the data order is the same, the augmentations' random draws are not
            seed_everything(self.args.seed + 1_000_003 * self.step + self.ranks.rank)
            if self.ranks.main:
                warnings.warn(
                    f"the checkpoint was written by {len(per_rank)} process(es), this run has {self.ranks.world}: the "
                    "random generators are re-seeded, so augmentations differ from an uninterrupted run (the data order "
                    "and the schedules do not)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        ignore = {*MODEL_KEYS, "version", "total_steps", "epochs", "max_steps", "device", "warmup_steps", "world_size"}
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in self.config.items() if k not in ignore and k in saved and saved[k] != v]
        if changed and self.ranks.main:
            warnings.warn(f"settings changed since the checkpoint: {', '.join(changed)}", RuntimeWarning, stacklevel=2)
        old_total = saved.get("total_steps")
        if old_total is not None and old_total != self.total_steps and self.ranks.main:
            warnings.warn(
                f"training length changed from {old_total} to {self.total_steps} steps: the learning-rate and tau "
                "schedules continue from the current step on the new length",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.ranks.main:
            truncate_metrics(self.metrics_path, self.step)

    # ------------------------------------------------------------------ checkpoints and outputs
    def _state(self) -> dict[str, Any]:
        rngs = self.ranks.gather(rng_state())
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_images": self.skipped_total,
            "elapsed_s": self._elapsed(),
            "rng": rngs[0],
            "rng_per_rank": rngs if self.ranks.world > 1 else None,
            "config": self.config,
        }

    def save(self) -> None:
        """Writes ``OUT/last.pt`` (previous one kept as ``last.prev.pt``); on rank 0, with every rank's RNG state."""
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.steps_per_epoch:  # end of an epoch: resume at the start of the next one
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        start = time.perf_counter()
        try:
            state = self._state()  # a collective: every rank takes part
            # Never write a diverged state over a finite checkpoint: one reduction per tensor on the device, one
            # host sync (the write below copies everything to the host anyway). Every rank checks its own copy and
            # they agree, so all of them stop together.
            bad = nonfinite_entries({k: state[k] for k in ("learner", "optimizer", "scaler")})
            if self.ranks.sum(int(bool(bad)))[0]:
                raise Diverged(self._nonfinite_message(bad))
            if self.ranks.main:
                try:
                    save_checkpoint(state, self.ckpt_path)
                except OSError as exc:
                    kept = f"{self.ckpt_path} still holds step {self.good_step}" if self.good_step is not None else "no checkpoint was written"
                    raise OutputError(f"{out_problem(self.out, exc)}; {kept}, re-run the command to resume") from exc
            self.good_step = self.step
        finally:
            self.epoch, self.batch_in_epoch = epoch, batch
        self.window_start += time.perf_counter() - start  # images/s measures training only

    def _last_good(self) -> str:
        """What the checkpoint files hold, for divergence messages (true: nothing non-finite is ever saved)."""
        if self.good_step is None:
            return f"no checkpoint was written yet, so {self.out} has no state to resume from"
        return (
            f"{self.ckpt_path} still holds the last good checkpoint (step {self.good_step}, not overwritten); "
            f"re-running resumes from it, so lower --lr first"
        )

    def _nonfinite_message(self, bad: list[str]) -> str:
        since = f"after step {self.good_step}" if self.good_step is not None else "since the start"
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return (
            f"the model state became NaN or infinite by step {self.step} (found when saving the step {self.step} "
            f"checkpoint; finite {since}): {names}. Not saved. Lower --lr, use --precision 32, or check the data; "
            f"{self._last_good()}"
        )

    def export_backbones(self) -> None:
        """Writes ``OUT/backbone.pt`` and ``OUT/backbone_ema.pt`` (plain ``state_dict``, CPU tensors); rank 0."""
        if not self.ranks.main:
            return
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        try:
            atomic_save(cpu(self.learner.net.state_dict()), self.out / "backbone.pt")
            if self.learner.target_encoder is not None:
                atomic_save(cpu(self.learner.target_encoder.net.state_dict()), self.out / "backbone_ema.pt")
        except OSError as exc:
            raise OutputError(f"{out_problem(self.out, exc)} (backbone export); re-run the command to export again") from exc

    def _say(self, msg: str) -> None:
        if self.ranks.main:
            self.bar.write(msg, file=sys.stderr)

    def _plot(self) -> None:
        self.last_plot = time.perf_counter()
        if self.ranks.main and "matplotlib" not in missing_train_extras():  # else said once at the start
            try:
                plot_metrics(self.metrics_path, self.out / "metrics.png")
            except OSError as exc:
                raise OutputError(f"{out_problem(self.out, exc)} (metrics.png); re-run the command to resume") from exc

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            try:
                self.metrics_file.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise OutputError(f"{out_problem(self.out, exc)} (metrics.jsonl); re-run the command to resume") from exc

    # ------------------------------------------------------------------ evaluation
    def _eval_split(self, name: str, dataset: LabelledImageFolder) -> Any:
        """The split as decoded ``(images, labels)`` tensors (cached), or a DataLoader if it is too large."""
        if name in self._eval_cache:
            return self._eval_cache[name]
        gen = torch.Generator()
        gen.manual_seed(self.args.seed)
        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            num_workers=self.args.workers,
            collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda",
            generator=gen,  # never draws from the global RNG, so evaluation cannot change the training run
            worker_init_fn=ignore_stop_signals,
        )
        if len(dataset) * 3 * self.image_size**2 > _EVAL_CACHE_BYTES:
            return loader  # too big to keep decoded in memory: decode at every evaluation
        batches = [(x, y) for x, y in loader if x.shape[0]]
        if not batches:
            raise _NoEvalData(f"--eval-data {name} split has no readable image")
        cached = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        self._eval_cache[name] = cached
        return cached

    def evaluate(self) -> None:
        """kNN accuracy of the online backbone's representation, logged as an ``eval`` record (rank 0 only)."""
        if self.eval_sets is None or not self.ranks.main:
            return
        from ..evaluate import collapse_stats, extract_features, knn_accuracy

        start = time.perf_counter()
        if self.step == 0:  # the first evaluation decodes both splits and takes seconds: say so before
            self._say(f"kNN evaluation of the random initialisation on {len(self.eval_sets[0])} + {len(self.eval_sets[1])} "
                      "images (--eval-data) ...")
        encoder = _Embedder(self.learner)
        try:
            train, test = (self._eval_split(n, d) for n, d in zip(("train", "test"), self.eval_sets))
        except _NoEvalData as exc:
            warnings.warn(f"{exc}: kNN evaluation disabled", RuntimeWarning, stacklevel=2)
            self.eval_sets = None
            return
        with autocast(self.device, self.precision):
            train_f = extract_features(encoder, train, batch_size=self.args.eval_batch_size, device=self.device)
            test_f = extract_features(encoder, test, batch_size=self.args.eval_batch_size, device=self.device)
        acc = knn_accuracy(
            None,
            train_f,
            test_f,
            k=self.args.knn_k,
            temperature=self.args.knn_temperature,
            num_classes=len(self.eval_sets[0].classes),
        )
        record: dict[str, Any] = {"event": "eval", "step": self.step, "epoch": self.epoch, "knn_accuracy": acc,
                                  "num_classes": len(self.eval_sets[0].classes)}
        if test_f[0].shape[0] >= 2:
            stats = collapse_stats(test_f[0])
            record.update(std_ratio=stats["std_ratio"], effective_rank=stats["effective_rank"])
        seconds = time.perf_counter() - start
        self.window_start += seconds  # images/s measures training only
        record.update(eval_seconds=round(seconds, 3), time=round(self._elapsed(), 3))
        self._log(record)
        self._flush_file()
        self._say(f"step {self.step}: kNN accuracy {100 * acc:.2f}% (k={self.args.knn_k})")
        from ..plot import health_warnings

        for message in health_warnings([record]):
            self._say(f"warning: {message}")
        if time.perf_counter() - self.last_plot > _PLOT_INTERVAL_S and self.step < self.total_steps:
            self._plot()  # refreshed during long runs; always written at the end

    # ------------------------------------------------------------------ training
    def _flush_file(self) -> None:
        if self.metrics_file is not None:
            try:
                self.metrics_file.flush()
            except OSError as exc:
                raise OutputError(f"{out_problem(self.out, exc)} (metrics.jsonl); re-run the command to resume") from exc

    def _flush(self) -> None:
        """Fetches the pending losses in one transfer and writes their per-step records.

        With several ranks the losses are averaged over the ranks first (one collective per flush, at the same
        steps on every rank), so the log shows the loss of the global batch and every rank sees a divergence.
        """
        if not self.pending:
            return
        losses = self.ranks.mean(torch.stack([p["loss"] for p in self.pending]).float()).cpu().tolist()
        now = time.perf_counter()
        rate = self.ranks.world * self.window_images / max(now - self.window_start, 1e-9)
        for p, loss in zip(self.pending, losses):
            p["loss"] = loss
            p["images_per_sec"] = round(rate, 2)
            self._log(p)
        self._flush_file()
        done, self.pending = self.pending, []
        last = done[-1]
        self.window_images, self.window_start = 0, now
        self.bar.set_postfix(
            {"loss": f"{last['loss']:.4f}", "tau": f"{last['tau']:.5f}", "lr": f"{last['lr']:.3g}", "img/s": f"{rate:.1f}"},
            refresh=False,
        )
        bad = next((p for p in done if not math.isfinite(p["loss"])), None)
        if bad is not None:
            raise Diverged(
                f"the loss became {bad['loss']} at step {bad['step']}; lower --lr, use --precision 32, or check the "
                f"data. {self._last_good()}"
            )

    def _train_step(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        out = train_step(self.learner, self.optimizer, images, schedule=self.schedule, model=self.model,
                         precision=self.precision, scaler=self.scaler)
        self.current_lr, self.current_tau = out.lr, out.tau
        return out.loss

    def run(self) -> int:
        """Trains to ``total_steps``; returns the exit status."""
        args = self.args
        self.t_start = self.last_plot = time.perf_counter()
        self.pending: list[dict[str, Any]] = []
        self.window_images, self.window_start = 0, time.perf_counter()
        self.bar = progress_bar(self.total_steps, self.step, args.no_progress or not self.ranks.main)
        if self.resumed_from is not None:
            self._say(
                f"resuming from {self.resumed_from} at step {self.step}/{self.total_steps} "
                f"(epoch {self.epoch}, batch {self.batch_in_epoch}/{self.steps_per_epoch})"
            )
        if self.ranks.world > 1:
            self._say(f"{self.ranks.world} processes, {self.rank_batch} images each per step (global batch {args.batch_size})")
        try:
            self.metrics_file = open(self.metrics_path, "a", encoding="utf-8") if self.ranks.main else None
        except OSError as exc:
            self._say(f"{PROG}: error: {out_problem(self.out, exc)} (metrics.jsonl)")
            self.bar.close()
            return 2
        try:
            with graceful_stop() as stop, one_line_warnings(self._say if self.ranks.main else None):
                return self._loop(stop)
        except Diverged as exc:
            self._say(f"{PROG}: error: {exc}")
            return EXIT_DIVERGED
        except OutputError as exc:
            self._say(f"{PROG}: error: {exc}")
            return 2
        finally:
            self.bar.close()
            if self.metrics_file is not None:
                self.metrics_file.close()

    def _loop(self, stop: dict[str, int]) -> int:
        args = self.args
        self.learner.train()
        if self.step == 0 and self.resumed_from is None:
            self.evaluate()  # the randomly initialised backbone, logged as step 0
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch * args.batch_size)
            skipped_epoch, step_at_start = 0, self.step
            for images, _, skipped in self.loader:
                self.batch_in_epoch += 1
                too_few = images.shape[0] < 2  # fewer readable images than BatchNorm needs: skip the batch
                stopping: bool | None = None  # one process: read the signal flag when it is needed
                if self.ranks.world > 1:
                    # Every rank must take the same steps and stop after the same one: agree on host flags (gloo,
                    # no GPU sync). A batch is skipped everywhere if any rank has too few images; a signal to any
                    # rank stops all of them (a signal arriving after this point counts at the next batch).
                    few, signalled, skipped = self.ranks.sum(int(too_few), int(bool(stop)), skipped)
                    too_few, stopping = few > 0, signalled > 0
                skipped_epoch += skipped
                self.skipped_total += skipped
                stepped = not too_few
                if stepped:
                    loss = self._train_step(images)
                    self.pending.append(
                        {
                            "event": "train",
                            "step": self.step,
                            "epoch": self.epoch,
                            "loss": loss,
                            "tau": self.current_tau,
                            "lr": self.current_lr,
                            "time": round(self._elapsed(), 3),
                            "skipped_images": self.skipped_total,
                        }
                    )
                    self.window_images += images.shape[0]
                    self.bar.update(1)
                    if len(self.pending) >= args.log_every:
                        self._flush()
                end_of_epoch = self.batch_in_epoch >= self.steps_per_epoch
                done = self.step >= self.total_steps
                if end_of_epoch and skipped_epoch:  # one line per epoch, through the bar (never a traceback-like echo)
                    self._say(f"warning: skipped {skipped_epoch} unreadable image(s) in epoch {self.epoch} "
                              f"({self.skipped_total} in total)")
                if end_of_epoch or done:
                    self._flush()
                    if done or (args.eval_every and (self.epoch + 1) % args.eval_every == 0):
                        self.evaluate()
                if stopping is None:
                    stopping = bool(stop)
                if done or stopping or (stepped and self.step % args.checkpoint_every == 0):
                    self._flush()
                    self.save()
                if done:
                    break
                if stopping:
                    sig = stop.get("signal", signal.SIGTERM)  # SIGTERM where another rank got the signal
                    self._plot()
                    self._say(
                        f"stopped by signal {sig} at step {self.step}; checkpoint saved to {self.ckpt_path}. "
                        f"To resume, run the same command again (same --out {self.out})"
                    )
                    return 128 + sig
            if self.step == step_at_start:
                self._say(f"{PROG}: error: no batch with at least 2 readable images in epoch {self.epoch}; check --data")
                return 1
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
        self._finish()
        return 0

    def _finish(self) -> None:
        self._flush()
        self.export_backbones()
        self._plot()
        if not self.ranks.main:
            return
        msg = f"done: {self.step} steps; backbones in {self.out / 'backbone.pt'} and {self.out / 'backbone_ema.pt'}"
        if self.skipped_total:
            msg += f"; {self.skipped_total} unreadable image(s) skipped"
        self._say(msg)
        evals = [r for r in read_metrics(self.metrics_path) if r.get("event") == "eval" and r.get("knn_accuracy") is not None]
        if len(evals) >= 2 and evals[0].get("step") == 0:
            first, last = evals[0], evals[-1]
            gain = 100 * (last["knn_accuracy"] - first["knn_accuracy"])
            self._say(
                f"kNN accuracy: {100 * first['knn_accuracy']:.2f}% with random weights (step 0) -> "
                f"{100 * last['knn_accuracy']:.2f}% after {last['step']} steps of BYOL ({gain:+.2f} points)"
            )
