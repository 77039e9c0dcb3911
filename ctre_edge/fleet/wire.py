"""The fleet wire format: one sparse model (optionally its input scaling and growth votes) as one byte string.

No pickle, no JSON: a fixed little-endian header, then per layer the connection count of each
input row, the output column of each connection and the values, then the biases, then a
BLAKE2b-64 checksum of everything before it. Integer widths are the smallest that hold the
numbers (a 10-wide output layer needs 1 byte per column index), so a model of C connections
costs about C x (index + value bytes) plus the biases and one small count per input row.

Layout (version 1)::

    magic b"CTREFLT" | version u8 | value code u8 (0 float32, 1 float16) | flags u8
    | n_layers u16 | round u32 | sizes u32 x (n_layers + 1)
    | per layer: nnz u32, count code u8, index code u8, n_votes u32, vote code u8
    | [flags & 2: note length u32]
    | [flags & 1: shift, scale float32 x sizes[0]]
    | per layer: counts, indices, values, bias (value dtype), votes
    | [flags & 2: note, UTF-8 JSON object]
    | blake2b-64 of all the bytes above

Votes are distinct linear positions ``i * n_out + j``, sent sorted: vote code 2 as uint32, vote
code 1 as the first one (uint32) then uint16 gaps (when every gap fits). The note carries the few
numbers that go with a model (round settings down, sample count and accuracies up), so that one
message is one model array and nothing else.

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
from ..layers import SparseLayer, check_layer

MAGIC = b"CTREFLT"
VERSION = 1
VALUE_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
INT_DTYPES = {0: np.dtype("u1"), 1: np.dtype("<u2"), 2: np.dtype("<u4")}
FLAG_SCALING = 1
FLAG_NOTE = 2
MAX_NOTE = 1 << 16
MAX_LAYERS = 64
MAX_WIDTH = 1 << 24
DIGEST = 8
_HEAD = struct.Struct("<7sBBBHI")
_LAYER = struct.Struct("<IBBIB")


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


def _int_code(max_value: int) -> int:
    return 0 if max_value < 1 << 8 else 1 if max_value < 1 << 16 else 2


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
        counts = np.diff(layer.indptr)
        ccode = _int_code(int(counts.max()) if counts.size else 0)
        icode = _int_code(layer.n_out - 1)
        vote = np.unique(np.asarray(vote, np.int64))
        if vote.size and (vote[0] < 0 or vote[-1] >= min(layer.n_in * layer.n_out, 1 << 32)):
            raise ValueError("votes must be linear positions inside the layer (below 2**32)")
        gaps = np.diff(vote)
        small = vote.size > 1 and int(gaps.max()) < 1 << 16
        parts.append(_LAYER.pack(layer.nnz, ccode, icode, int(vote.shape[0]), 1 if small else 2))
        body += [counts.astype(INT_DTYPES[ccode]).tobytes(), layer.indices.astype(INT_DTYPES[icode]).tobytes(),
                 layer.values.astype(vdt).tobytes(), layer.bias.astype(vdt).tobytes(),
                 (vote[:1].astype("<u4").tobytes() + gaps.astype("<u2").tobytes()) if small
                 else vote.astype("<u4").tobytes()]
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
        nnz, ccode, icode, n_votes, vote_code = _LAYER.unpack_from(blob, pos)
        pos += _LAYER.size
        if ccode not in INT_DTYPES or icode not in INT_DTYPES or nnz > sizes[l] * sizes[l + 1] \
                or n_votes > sizes[l] * sizes[l + 1] or vote_code not in (1, 2) or (vote_code == 1 and n_votes < 2):
            raise WireError(f"fleet message layer {l} header is invalid")
        specs.append((nnz, INT_DTYPES[ccode], INT_DTYPES[icode], n_votes, vote_code))
    note_len = 0
    if flags & FLAG_NOTE:
        if pos + 4 > end:
            raise WireError("fleet message is truncated in its header")
        (note_len,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if note_len > MAX_NOTE:
            raise WireError(f"fleet message note of {note_len} bytes is over the {MAX_NOTE} limit")
    total = sum(sizes[l] * c.itemsize + nnz * (i.itemsize + vdt.itemsize) + sizes[l + 1] * vdt.itemsize
                + (4 + 2 * (v - 1) if vc == 1 else 4 * v) for l, (nnz, c, i, v, vc) in enumerate(specs))
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
    for l, (nnz, cdt, idt, n_votes, vote_code) in enumerate(specs):
        counts = take(cdt, sizes[l]).astype(np.int64)
        indptr = np.zeros(sizes[l] + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = take(idt, nnz).astype(np.int32)
        values = take(vdt, nnz).astype(np.float32)
        bias = take(vdt, sizes[l + 1]).astype(np.float32)
        if vote_code == 1:
            vote = np.cumsum(np.concatenate([take("<u4", 1).astype(np.int64), take("<u2", n_votes - 1)]))
        else:
            vote = take("<u4", n_votes).astype(np.int64)
        layer = SparseLayer(sizes[l], sizes[l + 1], indptr, indices, values, bias)
        try:
            check_layer(layer, f"layer{l}")
        except ValueError as e:
            raise WireError(f"fleet message has an invalid topology: {e}") from None
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(bias))):
            raise WireError(f"fleet message layer {l} has NaN or Inf weights")
        if n_votes and (int(vote.max()) >= sizes[l] * sizes[l + 1] or np.any(np.diff(vote) <= 0)):
            raise WireError(f"fleet message layer {l} votes are not distinct positions inside the layer")
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
