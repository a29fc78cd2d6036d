"""Exact, device-side checksums of tensors, and norms for reporting.

The checksum of a tensor ``t`` is defined on its bytes in logical (row-major) order,
read as little-endian 64-bit words ``x[k]`` (the last word zero-padded). Each word is
mixed with its position by a non-linear bijection, and the results are summed:

    S = sum_k B[k div C] * h(x[k] XOR A[k mod C])  (mod 2**64)
    h(y) = xs32(xs29(xs33(y) * M1) * M2),   xs_s(y) = y XOR (y >> s) (logical shift)

``h`` is murmur3's 64-bit finaliser (``M1``, ``M2`` its odd constants); ``A`` and ``B``
are odd 64-bit constants from splitmix64 (``B[0] = 1``) and ``C = 2**14``. The result is
``fmix64(S + tag)``, where the tag hashes the dtype, the shape and, for quantized tensors,
the quantization parameters. Hence:

- a change confined to one 64-bit word (a flipped bit, a changed element of up to
  8 bytes) always changes the checksum: ``h`` and XOR with ``A`` are bijections and
  ``B`` is odd;
- several changes cancel only by chance (about ``2**-64``): ``h`` mixes every bit of a
  word into every bit of its value, so no fixed pattern of changes adds up to zero (the
  linear sum of version 1 missed any even number of float64 sign flips, because a flip
  of bit 63 added ``2**63`` whatever the weight);
- moving values to other positions changes it (the position keys ``A`` and ``B``);
- a reshape or a dtype view of the same bytes changes it (the tag);
- integer sums are exact and associative modulo 2**64, so the value does not depend
  on the number of threads, the reduction order, or the device.

Everything up to one ``int64`` per tensor is computed on the tensor's own device; many
tensors share one host transfer (:func:`tensor_checksums`). Large tensors are processed
in row blocks, so the temporaries stay small (in cache on CPU, where each thread reuses
two 4 MiB blocks), and the keys are cached per device: ``A`` (128 KiB), ``B`` and, for
batches of small tensors, the concatenated keys of the batch's layout. CPU tensors of at
most four words (a loss) are summed in Python by the same definition.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence

import torch

__all__ = ["tensor_checksum", "tensor_checksums", "tensor_norm", "tensor_norms"]

_MASK = 2**64 - 1
_C = 1 << 14  # words per row of the weight table
_SMALL_BATCH_WORDS = 1 << 20  # cap on one batch of small tensors (bounds the layout cache)
_MAX_LAYOUTS = 64
_HOST_WORDS = 4  # CPU tensors up to this many words are summed in Python (e.g. a loss)
_CPU_BLOCK_WORDS = 1 << 19  # 4 MiB of int64 temporaries per block: stays in cache
_DEVICE_BLOCK_WORDS = 1 << 25

# splitmix64 constants (the keys and the final bijection)
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
# murmur3 fmix64 constants (the per-word mix ``h``)
_H1 = 0xFF51AFD7ED558CCD
_H2 = 0xC4CEB9FE1A85EC53


def _signed(value: int) -> int:
    value &= _MASK
    return value - 2**64 if value >= 2**63 else value


def _fmix64(z: int) -> int:
    """splitmix64's finaliser on a Python int: a bijection of [0, 2**64)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _py_weight(index: int, salt: int) -> int:
    """Reference (pure Python) value of one weight: odd splitmix64 of ``index``."""
    return _fmix64((index + salt + 1) * _GAMMA) | 1


def _py_mix(word: int) -> int:
    """Reference (pure Python) value of ``h``, the per-word mix."""
    y = word & _MASK
    y ^= y >> 33
    y = (y * _H1) & _MASK
    y ^= y >> 29
    y = (y * _H2) & _MASK
    return y ^ (y >> 32)


def _lshr(x: torch.Tensor, shift: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking the sign-extended bits makes it logical
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _xorshift_(y: torch.Tensor, shift: int, scratch: torch.Tensor) -> None:
    """``y ^= y >> shift`` (logical shift), in place, using ``scratch`` (same shape)."""
    torch.bitwise_right_shift(y, shift, out=scratch)
    scratch.bitwise_and_((1 << (64 - shift)) - 1)
    y.bitwise_xor_(scratch)


def _mixed(
    words: torch.Tensor,
    keys: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h(words XOR keys)`` elementwise (``keys`` broadcasts), in ``out`` or a new tensor.

    ``out`` and ``scratch`` (both of ``words``' shape, int64) avoid allocating: on CPU a
    fresh multi-megabyte buffer may be mapped anew and page-faulted on every call (3.8x
    the arithmetic's time in an isolated benchmark).
    """
    y = torch.bitwise_xor(words, keys, out=out) if out is not None else words ^ keys
    if scratch is None:
        scratch = torch.empty_like(y)  # one temporary for the three shifts
    _xorshift_(y, 33, scratch)
    y.mul_(_signed(_H1))
    _xorshift_(y, 29, scratch)
    y.mul_(_signed(_H2))
    _xorshift_(y, 32, scratch)
    return y


def _mix_tensor(index: torch.Tensor, salt: int) -> torch.Tensor:
    """:func:`_py_weight` for an int64 tensor of indices, with wrap-around arithmetic."""
    z = (index + (salt + 1)) * _signed(_GAMMA)
    z = (z ^ _lshr(z, 30)) * _signed(_M1)
    z = (z ^ _lshr(z, 27)) * _signed(_M2)
    return (z ^ _lshr(z, 31)) | 1


_SALT_A = 0
_SALT_B = 1 << 40

_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_layouts: dict[
    tuple[torch.device, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
] = {}
_zeros: dict[torch.device, torch.Tensor] = {}
_workspace = threading.local()  # per thread: two CPU blocks of int64, reused


def _cpu_workspace() -> tuple[torch.Tensor, torch.Tensor]:
    """Two int64 buffers of ``_CPU_BLOCK_WORDS`` for this thread (8 MiB, kept for reuse)."""
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None or buffers[0].numel() < _CPU_BLOCK_WORDS:
        buffers = _workspace.buffers = (
            torch.empty(_CPU_BLOCK_WORDS, dtype=torch.int64),
            torch.empty(_CPU_BLOCK_WORDS, dtype=torch.int64),
        )
    return buffers


def _table_a(device: torch.device) -> torch.Tensor:
    return _table(device, 1)[0]


def _table(device: torch.device, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` on ``device`` with ``len(B) >= rows``."""
    cached = _tables.get(device)
    if cached is not None and cached[1].numel() >= rows:
        return cached
    a = _mix_tensor(torch.arange(_C, dtype=torch.int64, device=device), _SALT_A)
    size = 1 << max(rows - 1, 1).bit_length()
    b = _mix_tensor(torch.arange(size, dtype=torch.int64, device=device), _SALT_B)
    b[0] = 1  # a tensor of at most C words needs only A
    _tables[device] = (a, b)
    return a, b


@functools.lru_cache(maxsize=4096)
def _tag(dtype: torch.dtype, shape: tuple[int, ...], extra: str = "") -> int:
    text = f"torchrepro.checksum.v2|{dtype}|{shape}|{extra}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in logical order, as a contiguous 1-D uint8 tensor."""
    # callers run under no_grad, so views of parameters need no detach()
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1).contiguous()
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _zero_pad(device: torch.device, length: int) -> torch.Tensor:
    zeros = _zeros.get(device)
    if zeros is None:
        zeros = _zeros[device] = torch.zeros(8, dtype=torch.uint8, device=device)
    return zeros[:length]


def _words(raw: torch.Tensor) -> torch.Tensor:
    """``raw`` (uint8) as int64 words, zero-padding the last one."""
    pad = -raw.numel() % 8
    if pad:
        raw = torch.cat([raw, _zero_pad(raw.device, pad)])
    elif raw.storage_offset() % 8:
        raw = raw.clone()  # a view at an unaligned offset cannot be read as int64
    return raw.view(torch.int64)


def _large_sum(words: torch.Tensor) -> torch.Tensor:
    """``S`` (as a 0-d int64 tensor) of one tensor of more than ``C`` words."""
    m = words.numel()
    full, rest = divmod(m, _C)
    a, b = _table(words.device, full + 1)
    rows = words[: full * _C].view(full, _C)
    if words.device.type == "cpu":
        out, scratch = _cpu_workspace()
        step = _CPU_BLOCK_WORDS // _C

        def block_sums(i: int) -> torch.Tensor:
            size = min(step, full - i) * _C
            shape = (size // _C, _C)
            y = _mixed(rows[i : i + step], a, out[:size].view(shape), scratch[:size].view(shape))
            return y.sum(1)

        row_sums = torch.cat([block_sums(i) for i in range(0, full, step)])
    else:
        step = max(_DEVICE_BLOCK_WORDS // _C, 1)
        row_sums = torch.cat([_mixed(rows[i : i + step], a).sum(1) for i in range(0, full, step)])
    total = (row_sums * b[:full]).sum()
    if rest:
        total = total + _mixed(words[full * _C :], a[:rest]).sum() * b[full]
    return total


def _layout(
    device: torch.device, counts: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated weights, and segment start/end indices, for a batch of small tensors."""
    key = (device, counts)
    cached = _layouts.get(key)
    if cached is not None:
        return cached
    a = _table_a(device)
    weights = torch.cat([a[:n] for n in counts])
    ends, total = [], 0
    for n in counts:
        total += n
        ends.append(total)
    end = torch.tensor(ends, dtype=torch.int64, device=device)
    start = end - torch.tensor(counts, dtype=torch.int64, device=device)
    if len(_layouts) >= _MAX_LAYOUTS:
        _layouts.clear()
    _layouts[key] = (weights, start, end)
    return weights, start, end


def _small_sums(raw: list[torch.Tensor], counts: tuple[int, ...]) -> torch.Tensor:
    """``S`` of each small tensor, as one int64 tensor.

    ``raw`` holds each tensor's bytes followed by its zero padding to whole words;
    ``counts`` the number of words of each (at most ``C``).
    """
    device = raw[0].device
    weights, start, end = _layout(device, counts)
    words = torch.cat(raw).view(torch.int64)
    n = words.numel()
    if device.type == "cpu" and n <= _CPU_BLOCK_WORDS:
        out, scratch = _cpu_workspace()
        products = _mixed(words, weights, out[:n], scratch[:n])
    else:
        products = _mixed(words, weights)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), products.cumsum(0)])
    # differences of a wrap-around prefix sum are exact modulo 2**64
    return cumulative[end] - cumulative[start]


@functools.lru_cache(maxsize=_HOST_WORDS)
def _py_key(position: int) -> int:
    return _py_weight(position, _SALT_A)


def _host_sum(data: torch.Tensor) -> int:
    """``S`` of a CPU tensor of at most ``_HOST_WORDS`` words, in Python integers.

    The same definition as the device path (``B[0] = 1``); for a loss, one ``tolist``
    costs less than a dozen tiny tensor operations.
    """
    raw = bytes(data.tolist())
    raw += b"\0" * (-len(raw) % 8)
    total = 0
    for k in range(len(raw) // 8):
        word = int.from_bytes(raw[8 * k : 8 * k + 8], "little")
        total += _py_mix(word ^ _py_key(k))
    return total & _MASK


def _device_sums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """``S`` of tensors that share one device, with a single transfer to the host."""
    pieces: list[torch.Tensor] = []  # sums, in the order of ``slots``
    slots: list[int] = []
    raw: list[torch.Tensor] = []  # the current batch of small tensors
    counts: list[int] = []
    members: list[int] = []
    host: dict[int, int] = {}  # sums of tiny CPU tensors, computed in Python
    for i, t in enumerate(tensors):
        data = _bytes(t)
        n = data.numel()
        words = -(-n // 8)
        if words <= _HOST_WORDS and data.device.type == "cpu":
            host[i] = _host_sum(data)
            continue
        if words > _C:
            pieces.append(_large_sum(_words(data)).reshape(1))
            slots.append(i)
            continue
        if counts and sum(counts) + words > _SMALL_BATCH_WORDS:
            pieces.append(_small_sums(raw, tuple(counts)))
            slots.extend(members)
            raw, counts, members = [], [], []
        raw.append(data)
        if n % 8:
            raw.append(_zero_pad(data.device, -n % 8))
        counts.append(words)
        members.append(i)
    if counts:
        pieces.append(_small_sums(raw, tuple(counts)))
        slots.extend(members)
    values = torch.cat(pieces).tolist() if pieces else []
    sums = [0] * len(tensors)
    for slot, value in host.items():
        sums[slot] = value
    for slot, value in zip(slots, values, strict=True):
        sums[slot] = value & _MASK
    return sums


def tensor_checksums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Exact 64-bit checksums of many tensors, with one host transfer per device.

    Equal to ``[tensor_checksum(t) for t in tensors]``, but batches small tensors into a
    few device operations, which matters when it runs every training step.

    Args:
        tensors: dense tensors on any devices, any dtypes, contiguous or not.

    Returns:
        One int in ``[0, 2**64)`` per tensor, in order.

    Raises:
        TypeError: an item is not a ``torch.Tensor``, or has no dense values to read
            (sparse, nested, on the meta device, or of an unknown quantization scheme).

    >>> import torch
    >>> a, b = torch.arange(6.0), torch.ones(2, 3)
    >>> tensor_checksums([a, b]) == [tensor_checksum(a), tensor_checksum(b)]
    True
    """
    by_device: dict[torch.device, list[int]] = {}
    data: list[torch.Tensor] = []
    extras: list[str] = []
    with torch.no_grad():
        for i, t in enumerate(tensors):
            values, extra = _plain(t, i)
            data.append(values)
            extras.append(extra)
            by_device.setdefault(t.device, []).append(i)
        sums: list[int] = [0] * len(tensors)
        for indices in by_device.values():
            for i, s in zip(indices, _device_sums([data[i] for i in indices]), strict=True):
                sums[i] = s
    return [
        _fmix64(s + _tag(t.dtype, tuple(t.shape), extra))
        for s, t, extra in zip(sums, tensors, extras, strict=True)
    ]


def _plain(t: object, index: int) -> tuple[torch.Tensor, str]:
    """The dense tensor whose bytes stand for ``t``'s values, and what the tag adds.

    Lazy conjugate and negative views are resolved (their logical values count, not the
    stored ones). A quantized tensor counts as its integer representation, and its
    scheme, scale(s), zero point(s) and axis go into the tag.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"tensor_checksums expects torch.Tensor items, got {type(t).__name__} at index {index}"
        )
    if t.is_nested:
        raise TypeError(
            f"cannot checksum a nested tensor (index {index}); checksum its components: "
            "tensor_checksums(list(t.unbind()))"
        )
    if t.device.type == "meta":
        raise TypeError(
            f"cannot checksum a tensor on the meta device (index {index}): it has no values; "
            "materialise it first (e.g. model.to_empty(device=...) and initialise it)"
        )
    if t.layout != torch.strided:
        raise TypeError(
            f"tensor_checksum needs a dense (strided) tensor, got layout {t.layout} at index "
            f"{index}; convert it with .to_dense()"
        )
    if t.is_quantized:
        scheme = t.qscheme()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            extra = f"{scheme}|{t.q_scale()!r}|{t.q_zero_point()}"
        elif scheme in (
            torch.per_channel_affine,
            torch.per_channel_symmetric,
            torch.per_channel_affine_float_qparams,
        ):
            scales, zeros = tensor_checksums(
                [t.q_per_channel_scales(), t.q_per_channel_zero_points()]
            )
            extra = f"{scheme}|{scales:016x}|{zeros:016x}|{t.q_per_channel_axis()}"
        else:
            raise TypeError(
                f"cannot checksum a quantized tensor with scheme {scheme} (index {index}); "
                "checksum t.int_repr() and its quantization parameters instead"
            )
        return t.int_repr(), extra
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t, ""


def tensor_checksum(t: torch.Tensor) -> int:
    """An exact 64-bit checksum of a tensor's dtype, shape and values, bit for bit.

    Computed on the tensor's device in integer arithmetic (a weighted sum of its 64-bit
    words modulo 2**64, see the module docstring); only the final int reaches the host.
    Any single flipped bit changes it; contiguous and non-contiguous tensors with the same
    logical values agree; thread count and device do not matter.

    Args:
        t: a dense tensor of any dtype (bool, ints, floats, float8, complex).

    Returns:
        An int in ``[0, 2**64)``.

    Raises:
        TypeError: ``t`` is not a dense ``torch.Tensor``.

    >>> import torch
    >>> x = torch.arange(12.0).reshape(3, 4)
    >>> tensor_checksum(x) == tensor_checksum(x.t().contiguous().t())
    True
    >>> y = x.clone(); y.view(torch.int32)[1, 2] ^= 1  # flip the lowest bit of one float
    >>> tensor_checksum(x) == tensor_checksum(y)
    False
    """
    return tensor_checksums([t])[0]


_NATIVE = frozenset({torch.float32, torch.float64, torch.complex64, torch.complex128})
_LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})


def _norm_input(t: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """``(low precision, tensor to reduce)``: what ``_foreach_norm`` can take for ``t``."""
    dtype = t.dtype
    if dtype in _NATIVE:
        return False, t
    if dtype in _LOW_PRECISION:
        return True, t
    if dtype == torch.complex32:
        return False, t.to(torch.complex64)
    if t.is_floating_point():  # float8 variants
        return False, t.float()
    return False, t.double()  # ints and bool


def tensor_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Euclidean norms of many tensors, as Python floats, for reporting magnitudes.

    Floating-point and complex tensors are reduced in their own precision (float32 at
    least); integer and bool tensors in float64. The values are for people to read, not
    for equality: use :func:`tensor_checksums` for that. (A float64 reduction costs about
    20 times as much on CPU, and this runs every traced step.)

    Args:
        tensors: dense tensors on any devices.

    Returns:
        One float per tensor, in order (0.0 for an empty tensor).

    Raises:
        TypeError: an item is not a ``torch.Tensor``.

    >>> import torch
    >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([True, False])])
    [5.0, 1.0]
    """
    out: list[float] = [0.0] * len(tensors)
    groups: dict[tuple[torch.device, bool], list[torch.Tensor]] = {}
    positions: dict[tuple[torch.device, bool], list[int]] = {}
    with torch.no_grad():
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"tensor_norms expects torch.Tensor items, got {type(t).__name__} at index {i}"
                )
            low, reduced = _norm_input(t)
            key = (t.device, low)
            groups.setdefault(key, []).append(reduced)
            positions.setdefault(key, []).append(i)
        for (device, low), batch in groups.items():
            norms = torch._foreach_norm(batch, 2, dtype=torch.float32 if low else None)
            if device.type == "cpu":  # cheaper than stacking 0-d tensors
                values = [float(n) for n in norms]
            else:  # one transfer per device
                values = torch.stack(norms).to(torch.float64).tolist()
            for i, v in zip(positions[(device, low)], values, strict=True):
                out[i] = float(v)
    return out


def tensor_norm(t: torch.Tensor) -> float:
    """The Euclidean norm of ``t`` as a Python float, for reporting (see :func:`tensor_norms`).

    Args:
        t: a dense tensor.

    Returns:
        The norm.

    Raises:
        TypeError: ``t`` is not a ``torch.Tensor``.

    >>> import torch
    >>> tensor_norm(torch.tensor([3.0, 4.0]))
    5.0
    """
    return tensor_norms([t])[0]
