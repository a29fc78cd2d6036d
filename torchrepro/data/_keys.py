"""What travels from the sampler to the loading process: a batch of indices and its seeding."""

from __future__ import annotations

from typing import Any

OWN = 0  # samples seeded from (epoch, index)
STREAM = 1  # samples seeded from (epoch, rank, position in this rank's stream)


class KeyBatch(list[Any]):
    """The indices of one batch (what the dataset expects), and how to seed each sample.

    ``kind`` OWN: sample ``i`` is seeded from ``(epoch, self[i])``; STREAM: from
    ``(epoch, rank, start + i)``. ``unbatched``: ``batch_size=None``, one sample.
    """

    epoch: int
    kind: int
    rank: int
    start: int
    unbatched: bool

    def __reduce__(self) -> Any:  # a list and five ints: cheap to send to workers
        return (
            make_batch,
            (list(self), self.epoch, self.kind, self.rank, self.start, self.unbatched),
        )


def make_batch(  # noqa: PLR0917 (positional: __reduce__ calls it)
    items: list[Any], epoch: int, kind: int, rank: int, start: int, unbatched: bool
) -> KeyBatch:
    batch = KeyBatch(items)
    batch.epoch, batch.kind, batch.rank, batch.start, batch.unbatched = (
        epoch,
        kind,
        rank,
        start,
        unbatched,
    )
    return batch
