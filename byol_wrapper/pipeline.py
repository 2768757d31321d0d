"""How ``byol-train`` feeds batches: the folder path, the decoded cache (``--cache``) or GPU decoding (``--decode``).

All three iterate ``(images, labels, skipped)`` batches over the same :class:`~byol_wrapper.data.EpochSampler`, so
DDP sharding, mid-epoch resume and the count of unreadable files work the same way on each.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from torch.utils.data import BatchSampler, DataLoader

from .cache import open_cache
from .data import EpochSampler
from .decode import EncodedImages, FastDecode, GPUDecodedBatches, collate_encoded, resolve_decode

__all__ = ["fast_loader"]


def _identity(batch: Any) -> Any:
    return batch


def fast_loader(
    trainer: Any, args: argparse.Namespace, dataset: FastDecode, sampler: EpochSampler, loader: DataLoader, say: Callable[[str], None]
) -> tuple[Any, str]:
    """The loader ``byol-train`` iterates, and the path it takes: ``"cache"``, ``"gpu"`` or ``"cpu"``.

    Args:
        trainer: The run (``rank_batch``, ``device``, ``ranks``).
        args: The command line (``cache``, ``decode``, ``workers``, ``no_progress``).
        dataset: The folder dataset, decoded with the fast CPU decoders.
        sampler: The epoch sampler of the run.
        loader: The folder-path DataLoader (returned unchanged on the CPU path; its generator and
            ``worker_init_fn`` are reused).
        say: Where the one-line messages go.

    Raises:
        ValueError: the cache cannot be built or opened (message names the problem).
    """
    device = trainer.device
    if args.cache is not None:
        cache = open_cache(
            args.cache, dataset, workers=args.workers, say=say, progress=not args.no_progress and trainer.ranks.main
        )
        # One gather per batch in the main process: with the map in the page cache it costs far less than the
        # inter-process copy a worker would add.
        batches = DataLoader(
            cache,
            batch_size=None,
            sampler=BatchSampler(sampler, trainer.rank_batch, drop_last=True),
            num_workers=0,
            collate_fn=_identity,
            pin_memory=device.type == "cuda",
            generator=loader.generator,  # each epoch's iterator draws a seed from it, never from the global RNG
        )
        return batches, "cache"
    if resolve_decode(args.decode, device, say) == "gpu":
        encoded = DataLoader(
            EncodedImages(dataset.dataset),
            batch_size=trainer.rank_batch,
            sampler=sampler,
            num_workers=args.workers,
            collate_fn=collate_encoded,
            drop_last=True,
            persistent_workers=args.workers > 0,
            generator=loader.generator,
            worker_init_fn=loader.worker_init_fn,
        )
        return GPUDecodedBatches(encoded, dataset.load_size, dataset.mode, device, warn=dataset.warn), "gpu"
    return loader, "cpu"
