"""BYOL pretraining from the command line: ``byol-train`` or ``python -m byol_wrapper.train``.

Example:
    byol-train --data ~/images --eval-data ~/cifar10 --backbone resnet18 --cifar-stem --image-size 32 \\
        --batch-size 256 --epochs 200 --out runs/cifar

Re-running the same command with the same ``--out`` resumes from ``OUT/last.pt``. Resuming restores the step
counter, the position in the epoch (the epoch's shuffled order is recomputed from ``--seed`` and the epoch
number and the batches already trained are skipped, so the data order is the one of an uninterrupted run),
the optimizer, the loss scaler and all random number generators; the learning-rate and tau schedules are
functions of the step counter. See :func:`main` and ``--help`` for the flags.

Several processes: ``torchrun --nproc_per_node=N -m byol_wrapper.train ...`` trains
``DistributedDataParallel(learner)`` on N ranks (``cuda:LOCAL_RANK`` with NCCL, or CPUs with gloo).
``--batch-size`` is the global batch, split evenly: rank ``r`` takes every N-th index of each global batch
(:class:`~byol_wrapper.data.EpochSampler`), so the global batches are those of one process. Rank 0 writes every
output; the ranks agree on skipped batches and on stopping through one small host-side all-reduce per step.

Only one process writes an ``OUT``: rank 0 holds ``OUT/.byol-train.lock`` (:mod:`byol_wrapper.lock`) and a second
run on the same folder exits with status 2. No NaN or infinite state is ever saved (status 3, see :func:`main`).

Outputs in ``OUT``: ``last.pt`` and ``last.prev.pt`` (checkpoints, see :mod:`byol_wrapper.checkpoint`),
``backbone.pt`` and ``backbone_ema.pt`` (plain ``state_dict`` of the online and of the EMA target backbone, same
keys; rebuild the module with :func:`build_backbone`), ``metrics.jsonl``, ``metrics.png`` and ``config.json``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._extras import train_extras_notice
from ._workers import install_exit_guard, shutdown_loader
from ..lock import RunLock
from .args import PROG, UsageError, apply_demo, build_parser, check_augment_kwargs, default_threads
from .metrics import plot_metrics
from .runtime import EXIT_DIVERGED, OutputError, Ranks, lock_out, start_ranks
from .trainer import Trainer

__all__ = ["EXIT_DIVERGED", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``byol-train``.

    Args:
        argv: Command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 done, 1 no batch with 2 readable images, 2 bad command line, data or ``--out`` (message on
        stderr; also when another run holds ``--out``), 3 (:data:`EXIT_DIVERGED`) the loss or the model state
        became NaN or infinite (nothing non-finite was saved), 128 + signal number when stopped by SIGINT/SIGTERM
        after saving a checkpoint.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a parse error (already printed)
        return int(exc.code or 0)
    torch.set_num_threads(args.threads or default_threads())
    install_exit_guard()  # no DataLoader worker can keep the interpreter from exiting
    notice = train_extras_notice(progress=not args.no_progress)
    if notice and os.environ.get("RANK", "0") == "0":
        print(notice, file=sys.stderr, flush=True)  # once, at the start (not when the first plot is due)
    ranks: Ranks | None = None
    lock: RunLock | None = None
    trainer: Trainer | None = None
    try:
        try:
            check_augment_kwargs(args.augment_kwargs)  # before --out is created (a typo leaves no empty folder)
            ranks, device = start_ranks(args.device)
            if args.data is not None or args.demo:
                lock = lock_out(args.out, ranks)  # before anything is written to --out (the demo data too)
            if args.demo:
                if ranks.main:  # rank 0 generates the demo data; the others then find it complete and reuse it
                    args = apply_demo(args, parser, argv, say=lambda msg: print(msg, file=sys.stderr, flush=True))
                ranks.barrier()
                if not ranks.main:
                    args = apply_demo(args, parser, argv)
            trainer = Trainer(args, ranks, device)
        except UsageError as exc:
            if ranks is None or ranks.main:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        if trainer.step >= trainer.total_steps:
            if ranks.main:
                try:
                    trainer.export_backbones()
                    if not (trainer.out / "metrics.png").exists():
                        plot_metrics(trainer.metrics_path, trainer.out / "metrics.png")
                except (OutputError, OSError) as exc:
                    print(f"{PROG}: error: {exc}", file=sys.stderr)
                    return 2
                print(
                    f"training in {trainer.out} is already complete ({trainer.step}/{trainer.total_steps} steps); "
                    "backbones re-exported. Raise --epochs or --max-steps to train longer",
                    file=sys.stderr,
                )
            return 0
        try:
            status = trainer.run()
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            print(f"{PROG}: interrupted; resume from the last checkpoint in {trainer.out} by re-running the command", file=sys.stderr)
            return 130
        # Every rank ends here with the same status (they agree on every step and on stopping): rank 0 has written
        # its checkpoint and backbones before any rank leaves the process group.
        ranks.barrier()
        return status
    finally:
        if trainer is not None:  # on every path: done, error, signal (a traceback may keep the trainer alive)
            shutdown_loader(trainer.loader)
        if lock is not None:
            lock.release()
        if ranks is not None and ranks.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

