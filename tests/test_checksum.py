"""Checksums: exact, bit-sensitive, layout-independent, thread-independent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrepro.trace import _checksum
from torchrepro.trace._checksum import tensor_checksum, tensor_checksums, tensor_norm, tensor_norms

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def _from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw & 1  # only 0 and 1 are valid bools
    return raw.view(dtype).reshape(shape).clone()


def _reference(t: torch.Tensor) -> int:
    """The documented definition, in pure Python (a restatement: the properties are tested
    independently in test_checksum_strength.py)."""
    raw = bytes(t.detach().reshape(-1).contiguous().view(torch.uint8).tolist())
    raw += b"\0" * (-len(raw) % 8)
    total = 0
    for k in range(len(raw) // 8):
        word = int.from_bytes(raw[8 * k : 8 * k + 8], "little")
        row, col = divmod(k, _checksum._C)
        b = 1 if row == 0 else _checksum._py_weight(row, _checksum._SALT_B)
        key = _checksum._py_weight(col, _checksum._SALT_A)
        total += _checksum._py_mix(word ^ key) * b
    return _checksum._fmix64(total + _checksum._tag(t.dtype, tuple(t.shape)))


tensor_args = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(1, 5), min_size=0, max_size=3),
).flatmap(
    lambda ds: st.tuples(
        st.just(ds[0]),
        st.just(tuple(ds[1])),
        st.binary(
            min_size=_numel(ds[1]) * _size(ds[0]),
            max_size=_numel(ds[1]) * _size(ds[0]),
        ),
    )
)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@settings(max_examples=300, deadline=None)
@given(tensor_args, st.data())
def test_single_bit_flip_changes_checksum(
    args: tuple[torch.dtype, tuple[int, ...], bytes], data: st.DataObject
) -> None:
    dtype, shape, raw = args
    t = _from_bytes(raw, dtype, shape)
    position = data.draw(st.integers(0, len(raw) - 1), label="byte")
    bit = 0 if dtype == torch.bool else data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(t.reshape(-1).view(torch.uint8).tolist())
    flipped[position] ^= 1 << bit
    u = _from_bytes(bytes(flipped), dtype, shape)
    assert not torch.equal(t.reshape(-1).view(torch.uint8), u.reshape(-1).view(torch.uint8))
    assert tensor_checksum(t) != tensor_checksum(u)


@settings(max_examples=100, deadline=None)
@given(tensor_args)
def test_matches_reference_definition(args: tuple[torch.dtype, tuple[int, ...], bytes]) -> None:
    dtype, shape, raw = args
    t = _from_bytes(raw, dtype, shape)
    assert tensor_checksum(t) == _reference(t)


@pytest.mark.parametrize(
    "words", [_checksum._C - 1, _checksum._C, _checksum._C + 1, 3 * _checksum._C + 5]
)
def test_large_path_matches_reference(words: int) -> None:
    g = torch.Generator().manual_seed(words)
    t = torch.randint(-(2**62), 2**62, (words,), dtype=torch.int64, generator=g).view(torch.float32)
    t = t[1:]  # odd number of floats: a zero-padded last word, and an unaligned start
    assert tensor_checksum(t) == _reference(t)


@pytest.mark.parametrize("rows_per_block", [1, 2, 3])
def test_blocks_and_their_reused_buffers_match_reference(
    monkeypatch: pytest.MonkeyPatch, rows_per_block: int
) -> None:
    """Several CPU blocks, a short last one, a tail: the reused workspace leaks nothing."""
    monkeypatch.setattr(_checksum, "_CPU_BLOCK_WORDS", rows_per_block * _checksum._C)
    g = torch.Generator().manual_seed(rows_per_block)
    for words in (5 * _checksum._C + 7, 2 * _checksum._C, 7):
        t = torch.randint(-(2**62), 2**62, (words,), dtype=torch.int64, generator=g)
        assert tensor_checksum(t) == _reference(t)
    small = [torch.randn(n, generator=g) for n in (3, 100, 2000)]
    assert tensor_checksums(small) == [_reference(t) for t in small]


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.bool])
def test_layout_does_not_matter(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 10 * 16), dtype=torch.uint8, generator=g).view(dtype)
    assert tensor_checksum(x) == tensor_checksum(x.t().contiguous().t())
    assert tensor_checksum(x[:, ::3]) == tensor_checksum(x[:, ::3].contiguous())
    assert tensor_checksum(x[1:, 1:]) == tensor_checksum(x[1:, 1:].clone())
    assert tensor_checksum(x[::2]) == tensor_checksum(x[::2].contiguous())


def test_shape_and_dtype_matter() -> None:
    x = torch.arange(12, dtype=torch.float32)
    assert tensor_checksum(x) != tensor_checksum(x.reshape(3, 4))
    assert tensor_checksum(x.reshape(3, 4)) != tensor_checksum(x.reshape(4, 3))
    assert tensor_checksum(x) != tensor_checksum(x.view(torch.int32))
    assert tensor_checksum(torch.zeros(3)) != tensor_checksum(torch.zeros(4))
    assert tensor_checksum(torch.zeros(0)) != tensor_checksum(torch.zeros(0, 2))


@pytest.mark.parametrize("n", [10, 5000, 4 * _checksum._C])
def test_permutation_changes_checksum(n: int) -> None:
    x = torch.arange(n, dtype=torch.float32)
    assert tensor_checksum(x) != tensor_checksum(x.flip(0))
    swapped = x.clone()
    swapped[[0, n - 1]] = swapped[[n - 1, 0]]
    assert tensor_checksum(x) != tensor_checksum(swapped)
    adjacent = x.clone()
    adjacent[[0, 1]] = adjacent[[1, 0]]  # two floats in the same 64-bit word
    assert tensor_checksum(x) != tensor_checksum(adjacent)


def test_thread_count_does_not_matter() -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(1000, 700, generator=g),
        torch.randn(33, generator=g),
        torch.randn(40, 50, generator=g),
    ]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_checksums(tensors)
        torch.set_num_threads(2)
        two = tensor_checksums(tensors)
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_batched_equals_single_across_batches_and_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(n, generator=g)
        for n in (0, 1, 3, 300, 2 * _checksum._C + 7, 1000, 5 * _checksum._C)
    ]
    tensors.append(torch.randint(0, 2, (17,), generator=g).bool())
    singles = [_reference(t) for t in tensors]
    assert tensor_checksums(tensors) == singles
    monkeypatch.setattr(_checksum, "_SMALL_BATCH_WORDS", 600)  # several batches of small tensors
    monkeypatch.setattr(_checksum, "_CPU_BLOCK_WORDS", _checksum._C)  # one row per block
    monkeypatch.setattr(_checksum, "_layouts", {})
    assert tensor_checksums(tensors) == singles


def test_weight_table_matches_python_definition() -> None:
    a, b = _checksum._table(torch.device("cpu"), 5)
    for k in (0, 1, 2, 12345, _checksum._C - 1):
        assert int(a[k]) & _checksum._MASK == _checksum._py_weight(k, _checksum._SALT_A)
    assert int(b[0]) == 1
    assert int(b[4]) & _checksum._MASK == _checksum._py_weight(4, _checksum._SALT_B)


def test_requires_grad_and_grad_mode() -> None:
    p = torch.nn.Parameter(torch.arange(16.0).reshape(4, 4))
    assert tensor_checksum(p) == tensor_checksum(p.detach().clone())


def test_rejects_non_tensors_and_sparse() -> None:
    with pytest.raises(TypeError, match=r"expects torch\.Tensor items, got list at index 1"):
        tensor_checksums([torch.zeros(1), [1.0]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"dense \(strided\) tensor, got layout torch\.sparse_coo"):
        tensor_checksum(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match=r"expects torch\.Tensor items, got float at index 0"):
        tensor_norms([1.0])  # type: ignore[list-item]


def test_norms() -> None:
    assert tensor_norm(torch.tensor([3.0, 4.0])) == 5.0
    assert tensor_norm(torch.tensor([3.0, 4.0], dtype=torch.float16)) == 5.0
    assert (
        tensor_norm(torch.tensor([30000.0, 40000.0], dtype=torch.float16)) == 50000.0
    )  # no fp16 overflow
    assert tensor_norm(torch.tensor([3, 4])) == 5.0
    assert tensor_norm(torch.zeros(0)) == 0.0
    assert tensor_norms(
        [torch.tensor([1.0 + 1.0j]), torch.ones(4, dtype=torch.bfloat16)]
    ) == pytest.approx([2**0.5, 2.0])


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.bool]
)
def test_tiny_cpu_tensors_summed_on_the_host_equal_the_device_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A loss takes the Python path; it must give the very checksum the tensor path gives."""
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=g).to(dtype) for n in range(0, 40)]
    tensors += [torch.tensor(-0.0).to(dtype), torch.randn(3, 2, generator=g).t().to(dtype)]
    host = tensor_checksums(tensors)
    assert host == [_reference(t) for t in tensors]
    monkeypatch.setattr(_checksum, "_HOST_WORDS", 0)  # every tensor on the tensor path
    assert tensor_checksums(tensors) == host
