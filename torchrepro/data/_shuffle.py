"""A random-access permutation of ``range(n)``: position ``i`` of epoch ``e`` in O(1).

A balanced Feistel network on ``2h`` bits, the smallest even width with ``2**(2h) >= n``
(so the domain is less than ``4n``), with cycle-walking: positions that land at ``n`` or
above are encrypted again until they fall inside ``range(n)``, which keeps it a bijection
of ``range(n)`` (the walk from ``i`` stays on ``i``'s cycle and reaches ``range(n)``; a
walk takes fewer than 4 steps on average). The round function is MurmurHash3's 32-bit
finaliser of the half-block xor a round key; the 8 round keys are 32-bit words of
``derive_words(seed, "feistel", epoch, words=4)``. Computed on int64 tensors, a batch of
positions at a time: time and memory do not depend on ``n``.

Why not ``randperm``: it costs O(n) time and memory per epoch (seconds and gigabytes at
``n = 3e8``), paid again at every resume.
"""

from __future__ import annotations

import torch

from ..core._seed import derive_words

ROUNDS = 8
_M32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on values in [0, 2**32) held in int64 (products wrap, and
    only their low 32 bits are kept, which wrapping leaves exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


class Feistel:
    """The permutation of ``range(n)`` for one (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n, self.epoch = n, epoch
        bits = max(1, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        words = derive_words(seed, "feistel", epoch, words=4)
        self.keys = [(w >> s) & _M32 for w in words for s in (0, 32)][:ROUNDS]

    def _encrypt(self, x: torch.Tensor) -> torch.Tensor:
        half, mask = self.half, self.mask
        left, right = x >> half, x & mask
        for key in self.keys:
            left, right = right, left ^ (_fmix32(right ^ key) & mask)
        return (left << half) | right

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The indices at ``positions`` (an int64 tensor of values in ``range(n)``)."""
        if self.n <= 1:
            return positions.clone()
        out = self._encrypt(positions)
        outside = out >= self.n
        while bool(outside.any()):
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out
