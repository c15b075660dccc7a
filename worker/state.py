"""The one place where a user's state is packed into bytes and unpacked again.

Layout (little-endian), format version 2:

    u8   format version (2)
    u8   precision of the float arrays (0 = float32, 1 = float16, 2 = int8)
    u32  model version that produced the GRU state
    u32  events applied so far
    f64  timestamp of the last event
    i32  input partition of the last event applied, i64 its offset (-1, -1: none; a redelivered
         event of that partition at or below that offset is in the state already)
    u16  hidden size H, u16 relations A, u16 KB dim D, u16 history length L, u16 recent ids R
    H floats      GRU state h
    A*D floats    memory values v_1..v_A
                  (int8: H int8 then one f32 scale, A*D int8 then A f32 scales, one per slot;
                  value = q * scale / 127, so the error is at most scale / 254 per entry)
    ceil(A/8) B   evidence bits (key hashing's written-slot set)
    L x i32       the last L item indices, oldest first (seen-item filter, recomputation)
    R x u64       hashes of the most recent event ids (replayed duplicates change nothing)
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

FORMAT_VERSION = 2
_HEADER = struct.Struct("<BBIIdiq5H")
# Format 1 (before the last event's position): the same without the i32 and the i64.
_HEADER_V1 = struct.Struct("<BBIId5H")
_PRECISIONS = {"float32": (0, np.float32), "float16": (1, np.float16), "int8": (2, np.int8)}
_BY_CODE = {code: dtype for code, dtype in _PRECISIONS.values()}


class StateDecodeError(ValueError):
    """Stored bytes that are not a user state this worker can read."""


@dataclass
class StoredUser:
    """One user's state as the worker keeps it between events."""

    model_version: int
    events: int
    last_ts: float
    hidden: np.ndarray  # (H,) float32
    memory_values: np.ndarray  # (A, D) float32
    evidence: np.ndarray  # (A,) float32 0/1
    history: np.ndarray  # (L,) int32, the last item indices, oldest first
    recent_ids: list[int]  # event-id hashes, oldest first
    last_partition: int = -1  # input partition and offset of the last event applied (-1: none)
    last_offset: int = -1


def event_id_hash(event_id: str) -> int:
    """A stable 64-bit hash of an event id (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


def _quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows and one little-endian float32 scale per row (symmetric, the row's largest
    magnitude), over the last axis of an array of any rank."""
    rows = np.asarray(rows, dtype=np.float32)
    scale = np.abs(rows).max(axis=-1) if rows.size else np.zeros(rows.shape[:-1], np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.rint(rows / safe * 127).astype(np.int8), scale.astype("<f4")


def _quantize(rows: np.ndarray) -> bytes:
    """int8 rows with one float32 scale per row, as stored."""
    q, scale = _quantize_rows(rows)
    return q.tobytes() + scale.tobytes()


def _dequantize(raw: bytes, rows: int, width: int) -> np.ndarray:
    q = np.frombuffer(raw[: rows * width], dtype=np.int8).reshape(rows, width).astype(np.float32)
    scale = np.frombuffer(raw[rows * width :], dtype="<f4")
    return q * (scale[:, None] / 127)


def _float_bytes(code: int, dtype, h: int, a: int, d: int) -> tuple[int, int]:
    """Bytes of the hidden state and of the memory in a given precision."""
    if code == 2:
        return h + 4, a * d + 4 * a
    size = np.dtype(dtype).itemsize
    return h * size, a * d * size


def encode(user: StoredUser, precision: str = "float32") -> bytes:
    """Pack a user's state; `precision` picks how the float arrays are stored."""
    code, dtype = _PRECISIONS[precision]
    memory = np.asarray(user.memory_values)
    relations, kb_dim = memory.shape if memory.ndim == 2 else (0, 0)
    if code == 2:
        hidden_bytes = _quantize(np.asarray(user.hidden).reshape(1, -1))
        memory_bytes = _quantize(memory.reshape(relations, kb_dim))
    else:
        hidden_bytes = np.ascontiguousarray(user.hidden, dtype=dtype).tobytes()
        memory_bytes = np.ascontiguousarray(memory, dtype=dtype).tobytes()
    return _pack(user, code, np.asarray(user.hidden).shape[0], relations, kb_dim, hidden_bytes, memory_bytes)


def encode_many(users: list[StoredUser], precision: str = "float32") -> list[bytes]:
    """`encode` of each user, byte for byte, with the int8 rounding done for all of them at once: a
    batch's new states, where rounding them one by one was most of their packing (at a million
    users every event's state is written)."""
    code, _ = _PRECISIONS[precision]
    hiddens = [np.asarray(user.hidden) for user in users]
    memories = [np.asarray(user.memory_values) for user in users]
    if (code != 2 or len(users) < 2 or len({h.shape for h in hiddens}) > 1
            or len({m.shape for m in memories}) > 1 or memories[0].ndim != 2):
        return [encode(user, precision) for user in users]
    relations, kb_dim = memories[0].shape
    hidden_q, hidden_scale = _quantize_rows(np.stack(hiddens))  # (U, H), (U,)
    memory_q, memory_scale = _quantize_rows(np.stack(memories))  # (U, A, D), (U, A)
    return [
        _pack(user, code, hiddens[0].shape[0], relations, kb_dim,
              hidden_q[i].tobytes() + hidden_scale[i : i + 1].tobytes(),
              memory_q[i].tobytes() + memory_scale[i].tobytes())
        for i, user in enumerate(users)
    ]


def _pack(user: StoredUser, code: int, hidden_size: int, relations: int, kb_dim: int,
          hidden_bytes: bytes, memory_bytes: bytes) -> bytes:
    header = _HEADER.pack(
        FORMAT_VERSION, code, user.model_version, user.events, user.last_ts, user.last_partition,
        user.last_offset, hidden_size, relations, kb_dim, len(user.history), len(user.recent_ids),
    )
    evidence = np.packbits(np.asarray(user.evidence) > 0.5, bitorder="little")
    return b"".join((
        header,
        hidden_bytes,
        memory_bytes,
        evidence.tobytes(),
        np.asarray(user.history, dtype="<i4").tobytes(),
        np.asarray(user.recent_ids, dtype="<u8").tobytes(),
    ))


def decode(blob: bytes) -> StoredUser:
    """Unpack bytes written by `encode`; raises StateDecodeError with what was wrong."""
    version = blob[0] if blob else None
    header = _HEADER_V1 if version == 1 else _HEADER
    if len(blob) < header.size:
        raise StateDecodeError(f"user state of {len(blob)} bytes is shorter than its header")
    if version == 1:  # written before the last event's position was kept: none known
        version, code, model_version, events, last_ts, h, a, d, n_history, n_recent = header.unpack_from(blob)
        last_partition = last_offset = -1
    elif version == FORMAT_VERSION:
        (version, code, model_version, events, last_ts, last_partition, last_offset,
         h, a, d, n_history, n_recent) = header.unpack_from(blob)
    else:
        raise StateDecodeError(f"user state format {version}, this worker reads 1 and {FORMAT_VERSION}")
    if code not in _BY_CODE:
        raise StateDecodeError(f"unknown float precision code {code}")
    dtype = np.dtype(_BY_CODE[code])
    sizes = [*_float_bytes(code, dtype, h, a, d), (a + 7) // 8, 4 * n_history, 8 * n_recent]
    if len(blob) != header.size + sum(sizes):
        raise StateDecodeError(f"user state is {len(blob)} bytes, its header implies {header.size + sum(sizes)}")
    offset = header.size
    parts = []
    for size in sizes:
        parts.append(blob[offset : offset + size])
        offset += size
    if code == 2:
        hidden = _dequantize(parts[0], 1, h).reshape(h)
        memory = _dequantize(parts[1], a, d)
    else:
        hidden = np.frombuffer(parts[0], dtype=dtype).astype(np.float32)
        memory = np.frombuffer(parts[1], dtype=dtype).astype(np.float32).reshape(a, d)
    evidence = np.unpackbits(np.frombuffer(parts[2], dtype=np.uint8), count=a, bitorder="little")
    return StoredUser(
        model_version=model_version,
        events=events,
        last_ts=last_ts,
        hidden=hidden,
        memory_values=memory,
        evidence=evidence.astype(np.float32),
        history=np.frombuffer(parts[3], dtype="<i4").astype(np.int32),
        recent_ids=np.frombuffer(parts[4], dtype="<u8").tolist(),
        last_partition=last_partition,
        last_offset=last_offset,
    )


def to_tensors(users: list[StoredUser]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack stored users into the model's (B, H), (B, A, D), (B, A) tensors."""
    return (
        torch.from_numpy(np.stack([u.hidden for u in users])),
        torch.from_numpy(np.stack([u.memory_values for u in users])),
        torch.from_numpy(np.stack([u.evidence for u in users])),
    )
