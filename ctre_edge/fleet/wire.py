"""The fleet wire format: one sparse model (optionally its input scaling and growth votes) as one byte string.

No pickle, no JSON: a fixed little-endian header, then per layer the layer's connections as sorted
linear positions ``i * n_out + j`` in Elias-Fano code, the values and the biases, then the growth
votes (also sorted positions, also Elias-Fano), then a BLAKE2b-64 checksum of everything before it.
Elias-Fano stores n sorted numbers below U in about n x (2 + log2(U / n)) bits: 10-11 bits per
connection at epsilon 1 in a 1000 x 1000 layer (where CSR needs a 16-bit column index and a count
per row), so a model of C connections costs little more than C x value bytes plus the biases.

Layout (version 2)::

    magic b"CTREFLT" | version u8 | value code u8 (0 float32, 1 float16) | flags u8
    | n_layers u16 | round u32 | sizes u32 x (n_layers + 1)
    | per layer: nnz u32, n_votes u32
    | [flags & 2: note length u32]
    | [flags & 1: shift, scale float32 x sizes[0]]
    | per layer: connections (Elias-Fano), values, bias (value dtype), votes (Elias-Fano)
    | [flags & 2: note, UTF-8 JSON object]
    | blake2b-64 of all the bytes above

Elias-Fano of n positions below U (``_ef_encode``): L = floor(log2(U / n)) (0 if that is
negative or n is 0); the low L bits of each, packed little-endian in ceil(n L / 8) bytes; then a
bit array of n + (U - 1 >> L) + 1 bits (rounded up to bytes) with bit ``(p >> L) + k`` set for
the k-th position p. Every length follows from the header. The note carries the few numbers
that go with a model (round settings down, sample count and accuracies up), so that one message
is one model array and nothing else. Version 1 (CSR counts and column indices, gap-coded votes)
is no longer read.

``decode`` checks every length before it reads, the checksum, the CSR structure and that every
value is finite; anything else raises ``WireError`` with one line. It never allocates more than
the message's own size allows.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from ..errors import CtreError
from ..layers import SparseLayer, check_layer, csr_from_positions, linear_positions

MAGIC = b"CTREFLT"
VERSION = 2
VALUE_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
INT_DTYPES = {0: np.dtype("u1"), 1: np.dtype("<u2"), 2: np.dtype("<u4")}
FLAG_SCALING = 1
FLAG_NOTE = 2
MAX_NOTE = 1 << 16
MAX_LAYERS = 64
MAX_WIDTH = 1 << 24
DIGEST = 8
_HEAD = struct.Struct("<7sBBBHI")
_LAYER = struct.Struct("<II")


class WireError(CtreError, ValueError):
    """A fleet message is malformed, corrupt, foreign or from a newer format version."""

    exit_code = 5


@dataclass
class WireModel:
    """What one message carries: layers, optional scaling, optional growth votes per layer."""

    layers: list[SparseLayer]
    round: int = 0
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None
    votes: list[np.ndarray] = field(default_factory=list)
    note: dict | None = None

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].n_in] + [layer.n_out for layer in self.layers]


def _ef_low_bits(n: int, universe: int) -> int:
    return 0 if n == 0 or universe <= n else (universe // n).bit_length() - 1


def _ef_sizes(n: int, universe: int) -> tuple[int, int, int]:
    """(L, bytes of the low part, bytes of the high part) of n positions below ``universe``."""
    low = _ef_low_bits(n, universe)
    high_bits = 0 if n == 0 else n + ((universe - 1) >> low) + 1
    return low, (n * low + 7) // 8, (high_bits + 7) // 8


def _ef_encode(pos: np.ndarray, universe: int) -> bytes:
    """Elias-Fano bytes of sorted (non-decreasing) positions below ``universe``."""
    n = pos.shape[0]
    low, _, high_bytes = _ef_sizes(n, universe)
    if n == 0:
        return b""
    pos = pos.astype(np.uint64)
    bits = ((pos[:, None] >> np.arange(low, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    high = np.zeros(high_bytes * 8, np.uint8)
    high[(pos >> np.uint64(low)).astype(np.int64) + np.arange(n)] = 1
    return np.packbits(bits.ravel(), bitorder="little").tobytes() + np.packbits(high, bitorder="little").tobytes()


def _ef_decode(low_part: np.ndarray, high_part: np.ndarray, n: int, universe: int, what: str) -> np.ndarray:
    """Strictly increasing int64 positions below ``universe``; WireError if the code is not that."""
    if n == 0:
        return np.empty(0, np.int64)
    low = _ef_low_bits(n, universe)
    ones = np.flatnonzero(np.unpackbits(high_part, bitorder="little"))
    if ones.shape[0] != n:
        raise WireError(f"fleet message {what} code holds {ones.shape[0]} positions, its header says {n}")
    pos = (ones - np.arange(n)).astype(np.int64) << low
    if low:
        bits = np.unpackbits(low_part, bitorder="little")[:n * low].reshape(n, low).astype(np.int64)
        pos |= bits @ (np.int64(1) << np.arange(low, dtype=np.int64))
    if int(pos[-1]) >= universe or np.any(np.diff(pos) <= 0):
        raise WireError(f"fleet message {what} are not distinct positions inside the layer (invalid topology)")
    return pos


def encode(model: WireModel, value_dtype: str = "float32") -> bytes:
    """The message bytes of ``model``; same model, same bytes."""
    vcode = {"float32": 0, "float16": 1}.get(value_dtype)
    if vcode is None:
        raise ValueError(f"value_dtype must be float32 or float16; got {value_dtype!r}")
    vdt = VALUE_DTYPES[vcode]
    layers = model.layers
    votes = model.votes or [np.empty(0, np.int64)] * len(layers)
    if len(votes) != len(layers):
        raise ValueError("one votes array per layer is needed")
    note = b"" if model.note is None else json.dumps(model.note, sort_keys=True, separators=(",", ":")).encode()
    if len(note) > MAX_NOTE:
        raise ValueError(f"the note has {len(note)} bytes; at most {MAX_NOTE} fit")
    flags = (FLAG_SCALING if model.shift is not None else 0) | (FLAG_NOTE if model.note is not None else 0)
    parts = [_HEAD.pack(MAGIC, VERSION, vcode, flags, len(layers), int(model.round)),
             np.asarray(model.sizes, "<u4").tobytes()]
    body = []
    for layer, vote in zip(layers, votes):
        total = layer.n_in * layer.n_out
        vote = np.unique(np.asarray(vote, np.int64))
        if vote.size and (vote[0] < 0 or vote[-1] >= total):
            raise ValueError("votes must be linear positions inside the layer")
        parts.append(_LAYER.pack(layer.nnz, int(vote.shape[0])))
        body += [_ef_encode(linear_positions(layer), total), layer.values.astype(vdt).tobytes(),
                 layer.bias.astype(vdt).tobytes(), _ef_encode(vote, total)]
    if flags & FLAG_NOTE:
        parts.append(struct.pack("<I", len(note)))
    if flags & FLAG_SCALING:
        parts += [np.asarray(model.shift, "<f4").tobytes(), np.asarray(model.scale, "<f4").tobytes()]
    blob = b"".join(parts + body) + note
    return blob + hashlib.blake2b(blob, digest_size=DIGEST).digest()


def decode(blob: bytes, expect_sizes: list[int] | None = None) -> WireModel:
    """Parse and validate message bytes; raise ``WireError`` (one line) on any defect."""
    blob = bytes(blob)
    if len(blob) < _HEAD.size + DIGEST:
        raise WireError(f"fleet message of {len(blob)} bytes is too short to be a model")
    magic, version, vcode, flags, n_layers, rnd = _HEAD.unpack_from(blob, 0)
    if magic != MAGIC:
        raise WireError("not a ctre-edge fleet message (bad magic)")
    if version != VERSION:
        raise WireError(f"fleet message version {version}; this ctre-edge reads version {VERSION}")
    if hashlib.blake2b(blob[:-DIGEST], digest_size=DIGEST).digest() != blob[-DIGEST:]:
        raise WireError("fleet message checksum mismatch (corrupt or altered in transit)")
    if vcode not in VALUE_DTYPES or flags & ~(FLAG_SCALING | FLAG_NOTE) or not 1 <= n_layers <= MAX_LAYERS:
        raise WireError(f"fleet message header is invalid (value code {vcode}, flags {flags}, {n_layers} layers)")
    end = len(blob) - DIGEST
    pos = _HEAD.size
    need = 4 * (n_layers + 1) + _LAYER.size * n_layers
    if pos + need > end:
        raise WireError("fleet message is truncated in its header")
    sizes = [int(s) for s in np.frombuffer(blob, "<u4", n_layers + 1, pos)]
    pos += 4 * (n_layers + 1)
    if min(sizes) < 1 or max(sizes) > MAX_WIDTH:
        raise WireError(f"fleet message has invalid layer sizes {sizes}")
    if expect_sizes is not None and sizes != list(expect_sizes):
        raise WireError(f"fleet message has layer sizes {sizes}; this run's model has {list(expect_sizes)}")
    vdt = VALUE_DTYPES[vcode]
    specs = []
    for l in range(n_layers):
        nnz, n_votes = _LAYER.unpack_from(blob, pos)
        pos += _LAYER.size
        if nnz > sizes[l] * sizes[l + 1] or n_votes > sizes[l] * sizes[l + 1]:
            raise WireError(f"fleet message layer {l} header is invalid")
        specs.append((nnz, n_votes))
    note_len = 0
    if flags & FLAG_NOTE:
        if pos + 4 > end:
            raise WireError("fleet message is truncated in its header")
        (note_len,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if note_len > MAX_NOTE:
            raise WireError(f"fleet message note of {note_len} bytes is over the {MAX_NOTE} limit")
    total = 0
    for l, (nnz, n_votes) in enumerate(specs):
        universe = sizes[l] * sizes[l + 1]
        total += sum(_ef_sizes(nnz, universe)[1:]) + (nnz + sizes[l + 1]) * vdt.itemsize \
            + sum(_ef_sizes(n_votes, universe)[1:])
    total += (8 * sizes[0] if flags & FLAG_SCALING else 0) + note_len
    if pos + total != end:
        raise WireError(f"fleet message body has {end - pos} bytes; its header describes {total}")

    def take(dtype, count):
        nonlocal pos
        arr = np.frombuffer(blob, dtype, count, pos)
        pos += arr.nbytes
        return arr

    shift = scale = None
    if flags & FLAG_SCALING:
        shift, scale = take("<f4", sizes[0]).astype(np.float32), take("<f4", sizes[0]).astype(np.float32)
        if not (np.all(np.isfinite(shift)) and np.all(np.isfinite(scale))):
            raise WireError("fleet message scaling has NaN or Inf")
    layers, votes = [], []
    for l, (nnz, n_votes) in enumerate(specs):
        n_in, n_out = sizes[l], sizes[l + 1]
        universe = n_in * n_out
        _, lo_bytes, hi_bytes = _ef_sizes(nnz, universe)
        conn = _ef_decode(take("u1", lo_bytes), take("u1", hi_bytes), nnz, universe, f"layer {l} connections")
        indptr, indices, _ = csr_from_positions(n_in, n_out, conn)
        values = take(vdt, nnz).astype(np.float32)
        bias = take(vdt, n_out).astype(np.float32)
        _, lo_bytes, hi_bytes = _ef_sizes(n_votes, universe)
        vote = _ef_decode(take("u1", lo_bytes), take("u1", hi_bytes), n_votes, universe, f"layer {l} votes")
        layer = SparseLayer(sizes[l], sizes[l + 1], indptr, indices, values, bias)
        try:
            check_layer(layer, f"layer{l}")
        except ValueError as e:
            raise WireError(f"fleet message has an invalid topology: {e}") from None
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(bias))):
            raise WireError(f"fleet message layer {l} has NaN or Inf weights")
        layers.append(layer)
        votes.append(vote)
    note = None
    if flags & FLAG_NOTE:
        try:
            note = json.loads(blob[pos:pos + note_len].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise WireError("fleet message note is not UTF-8 JSON") from None
        if not isinstance(note, dict):
            raise WireError("fleet message note is not a JSON object")
    return WireModel(layers, int(rnd), shift, scale, votes, note)


def payload_floor(layers: list[SparseLayer], index_bytes: int = 2, value_bytes: int = 4) -> int:
    """connections x (index + value bytes) + biases: the least any sparse encoding can send."""
    return sum(layer.nnz * (index_bytes + value_bytes) + layer.n_out * value_bytes for layer in layers)


def dense_bytes(sizes: list[int], value_bytes: int = 4) -> int:
    """What a dense FedAvg of the same network sends per client per direction."""
    return sum((sizes[l] + 1) * sizes[l + 1] for l in range(len(sizes) - 1)) * value_bytes
