"""The checksum sees every change: properties tested against independent references.

No test here restates the checksum's formula. The reference is the tensors' own bytes:
two tensors whose bytes (or dtype, shape) differ must get different checksums, and
tensors with equal bytes equal ones. Each case below was missed by the linear checksum
of trace format version 1 (a flip of bit 63 added 2**63 whatever the weight).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from torchrepro.trace._checksum import tensor_checksum, tensor_checksums

FLOATS = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _values(n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g, dtype=torch.float64) + 0.5  # no zeros: -x differs from x
    if dtype.is_complex:
        return torch.complex(x, x.flip(0)).to(dtype)
    return x.to(dtype)


def _negated(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no neg kernel: exact via float32
        return (-x.float()).to(x.dtype)
    return -x


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16, 33, 20000, 40001])
def test_whole_tensor_negation_changes_checksum(dtype: torch.dtype, n: int) -> None:
    x = _values(n, dtype)
    negated = _negated(x)
    assert not torch.equal(x.view(torch.uint8), negated.view(torch.uint8))
    assert tensor_checksum(x) != tensor_checksum(negated)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [8, 9])
def test_every_pair_of_sign_flips_changes_checksum(dtype: torch.dtype, n: int) -> None:
    x = _values(n, dtype)
    base = tensor_checksum(x)
    flipped = []
    for i, j in itertools.combinations(range(n), 2):
        y = x.clone()
        y[i], y[j] = -y[i], -y[j]
        flipped.append(y)
    assert len(flipped) == n * (n - 1) // 2
    sums = tensor_checksums(flipped)
    assert base not in sums
    assert len(set(sums)) == len(sums)  # distinct pairs of flips are told apart too


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int8])
def test_every_swap_of_two_unequal_elements_changes_checksum(dtype: torch.dtype) -> None:
    x = torch.arange(1, 11).to(dtype)
    base = tensor_checksum(x)
    for i, j in itertools.combinations(range(10), 2):
        y = x.clone()
        y[[i, j]] = y[[j, i]]
        assert tensor_checksum(y) != base, (i, j)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_negative_zero_differs_from_zero(dtype: torch.dtype) -> None:
    for n in (1, 2, 5):
        zero = torch.zeros(n, dtype=dtype)
        negative = zero.clone()
        negative[n // 2] = -0.0
        assert torch.equal(zero, negative)  # equal as numbers, not as bits
        assert tensor_checksum(zero) != tensor_checksum(negative)
        assert tensor_checksum(-zero) != tensor_checksum(zero)


@pytest.mark.parametrize(
    ("dtype", "bits", "payloads"),
    [
        (torch.float32, torch.int32, [0x7FC00000, 0x7FC00001, 0x7F800001, -0x00400000]),
        (torch.float64, torch.int64, [0x7FF8000000000000, 0x7FF8000000000001, -(2**51)]),
    ],
)
def test_nan_payloads_are_told_apart(
    dtype: torch.dtype, bits: torch.dtype, payloads: list[int]
) -> None:
    tensors = [torch.tensor([1.0, 0.0, 2.0], dtype=dtype) for _ in payloads]
    for t, payload in zip(tensors, payloads, strict=True):
        t.view(bits)[1] = payload
        assert torch.isnan(t[1])
    sums = tensor_checksums(tensors)
    assert len(set(sums)) == len(payloads)


def test_equal_bytes_give_equal_checksums_across_layouts() -> None:
    x = _values(60, torch.float32).reshape(6, 10)
    assert tensor_checksum(x.t().contiguous().t()) == tensor_checksum(x)
    assert tensor_checksum(x[:, 1:]) == tensor_checksum(x[:, 1:].clone())


def test_lazy_conjugate_and_negative_views_count_their_values() -> None:
    z = torch.complex(torch.arange(4.0), torch.arange(4.0) + 1)
    assert z.conj().is_conj()
    assert tensor_checksum(z.conj()) == tensor_checksum(z.conj().resolve_conj())
    assert tensor_checksum(z.conj()) != tensor_checksum(z)
    neg = z.conj().imag  # a lazy negative view
    assert neg.is_neg()
    assert tensor_checksum(neg) == tensor_checksum(neg.resolve_neg())


def test_quantized_tensors_are_checksummed_with_their_parameters() -> None:
    x = torch.linspace(-1, 1, 12)
    q = torch.quantize_per_tensor(x, 0.1, 3, torch.qint8)
    same = torch.quantize_per_tensor(x, 0.1, 3, torch.qint8)
    other_scale = torch.quantize_per_tensor(x * 2, 0.2, 3, torch.qint8)
    assert torch.equal(q.int_repr(), other_scale.int_repr())
    assert tensor_checksum(q) == tensor_checksum(same)
    assert tensor_checksum(q) != tensor_checksum(other_scale)
    w = x.reshape(3, 4)
    scales, zeros = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1, 2])
    pc = torch.quantize_per_channel(w, scales, zeros, 0, torch.quint8)
    pc2 = torch.quantize_per_channel(w, scales * 1.0001, zeros, 0, torch.quint8)
    assert tensor_checksum(pc) != tensor_checksum(pc2) or not torch.equal(
        pc.int_repr(), pc2.int_repr()
    )
    assert tensor_checksum(pc) == tensor_checksum(
        torch.quantize_per_channel(w, scales, zeros, 0, torch.quint8)
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.empty(3, device="meta"), "meta device"),
        (
            lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]),
            "nested tensor",
        ),
    ],
)
def test_tensors_without_dense_values_are_refused_clearly(make, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        tensor_checksum(make())
