"""The sample order: one global permutation per epoch, split into global batches.

Epoch ``e`` reads ``perm_e = randperm(n)`` drawn from a private generator seeded with
``derive_seed(seed, "shuffle", e)`` (the identity without shuffling); the permutation
does not depend on the world size. Global batch ``g`` is ``perm_e[g*B*W:(g+1)*B*W]``
for batch size ``B`` and world size ``W``, and rank ``r`` takes its slice
``[r*B:(r+1)*B]``. A last, partial global batch of ``m`` samples is dropped whole with
``drop_last``; otherwise it is padded to ``ceil(m/W)*W`` samples by wrapping to the start
of the permutation and split evenly, so every rank gets the same number of batches.
With ``W == 1`` this is plain batching of ``perm_e``.

The sampler yields keys ``(epoch, index)``: the epoch travels with each key to the
worker that loads it, so persistent workers and prefetching cannot mix epochs up.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .._seed import derive_seed

_CHUNK = 8192  # sample positions converted to Python ints at a time


class Order:
    """Which samples each rank reads in each epoch, from which batch on."""

    def __init__(
        self,
        *,
        length: int,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        """Batches each rank receives per epoch (the same on every rank)."""
        full, rest = divmod(self.length, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def samples_per_rank(self) -> int:
        full, rest = divmod(self.length, self.global_batch)
        tail = 0 if self.drop_last or not rest else -(-rest // self.world_size)
        return full * self.batch_size + tail

    def samples_consumed(self, batches: int) -> int:
        """Samples of the global order consumed after ``batches`` global batches."""
        return min(batches * self.global_batch, self.length)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", epoch))
            perm = torch.randperm(self.length, generator=gen)
        else:
            perm = torch.arange(self.length)
        self._cached = (epoch, perm)
        return perm

    def keys(self, epoch: int, start_batch: int) -> Iterator[tuple[int, int]]:
        """This rank's ``(epoch, index)`` keys from batch ``start_batch`` to the epoch's end.

        Costs O(n) for the permutation, nothing per skipped sample.
        """
        n, b, w, r = self.length, self.batch_size, self.world_size, self.rank
        if n == 0:
            return
        perm = self.permutation(epoch)
        full = n // self.global_batch
        rows = perm[: full * self.global_batch].view(full, w, b)[:, r, :]
        step = max(1, _CHUNK // b)
        for first in range(start_batch, full, step):
            for index in rows[first : first + step].reshape(-1).tolist():
                yield (epoch, index)
        rest = n - full * self.global_batch
        if rest and not self.drop_last and start_batch <= full:
            per_rank = -(-rest // w)
            begin = full * self.global_batch + r * per_rank
            for position in range(begin, begin + per_rank):
                yield (epoch, int(perm[position % n]))


class KeySampler(Sampler[tuple[int, int]]):
    """Yields this rank's keys for ``epoch`` from ``start_batch`` on; the loader sets both
    before each iterator is built (or a persistent one is reset)."""

    def __init__(self, order: Order) -> None:
        self.order = order
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.order.keys(self.epoch, self.start_batch)

    def __len__(self) -> int:
        return self.order.samples_per_rank()
