"""User state bytes: one encoder, a version byte, and clear errors for anything else."""

from __future__ import annotations

import numpy as np
import pytest

from worker.state import (
    FORMAT_VERSION,
    StateDecodeError,
    StoredUser,
    decode,
    encode,
    encode_many,
    event_id_hash,
)


def sample_user(relations: int = 10, kb_dim: int = 64, hidden: int = 128) -> StoredUser:
    rng = np.random.default_rng(0)
    return StoredUser(
        model_version=7, events=3, last_ts=874965758.5,
        hidden=rng.standard_normal(hidden).astype(np.float32),
        memory_values=rng.standard_normal((relations, kb_dim)).astype(np.float32),
        evidence=(rng.random(relations) < 0.5).astype(np.float32),
        history=np.array([5, 1682, 3], dtype=np.int32), recent_ids=[event_id_hash("a"), event_id_hash("b")],
    )


def test_float32_state_round_trips_exactly() -> None:
    user = sample_user()
    blob = encode(user)
    assert blob[0] == FORMAT_VERSION
    back = decode(blob)
    assert np.array_equal(back.hidden, user.hidden)
    assert np.array_equal(back.memory_values, user.memory_values)
    assert np.array_equal(back.evidence, user.evidence)
    assert (back.model_version, back.events, back.last_ts) == (7, 3, 874965758.5)
    assert back.history.tolist() == [5, 1682, 3] and back.recent_ids == user.recent_ids


def test_float16_state_is_smaller_and_close() -> None:
    user = sample_user()
    full, half = encode(user, "float32"), encode(user, "float16")
    assert len(half) < 0.55 * len(full)
    back = decode(half)
    np.testing.assert_allclose(back.memory_values, user.memory_values, atol=2e-3, rtol=1e-3)


def test_int8_state_is_a_quarter_and_within_its_error_bound() -> None:
    user = sample_user()
    user.memory_values[3] = 0.0  # a slot never written: scale 0 must decode to exact zeros
    full, small = encode(user, "float32"), encode(user, "int8")
    assert len(small) < 0.3 * len(full)
    back = decode(small)
    bound_h = np.abs(user.hidden).max() / 254 + 1e-7
    assert np.abs(back.hidden - user.hidden).max() <= bound_h
    bounds = np.abs(user.memory_values).max(axis=1, keepdims=True) / 254 + 1e-7
    assert (np.abs(back.memory_values - user.memory_values) <= bounds).all()
    assert not back.memory_values[3].any()
    assert np.array_equal(back.evidence, user.evidence) and back.recent_ids == user.recent_ids


def test_default_model_state_fits_the_per_user_budget_in_int8() -> None:
    # Default dims (hidden 128, 10 relations of 64), one event: the scale goal is <= 1.5 KB on disk.
    user = sample_user()
    user.history = user.history[:1]
    user.recent_ids = user.recent_ids[:1]
    assert len(encode(user, "float16")) > 1536 > len(encode(user, "int8")) + 300


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_state_without_memory_round_trips(precision: str) -> None:
    user = sample_user(relations=0, kb_dim=0)
    user.memory_values = np.zeros((0, 0), np.float32)
    back = decode(encode(user, precision))
    assert back.memory_values.shape == (0, 0) and back.evidence.shape == (0,)


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_encoding_many_users_at_once_gives_each_ones_own_bytes(precision: str) -> None:
    """encode_many rounds a batch's states to int8 in one go; every user's bytes are encode's."""
    rng = np.random.default_rng(1)
    users = []
    for n in range(6):
        user = sample_user()
        user.hidden = (rng.standard_normal(128) * 4.0 ** n).astype(np.float32)
        user.memory_values = (rng.standard_normal((10, 64)) * 4.0 ** -n).astype(np.float32)
        user.events, user.last_offset, user.history = n, 100 + n, np.arange(n, dtype=np.int32)
        users.append(user)
    users[1].memory_values[3] = 0.0  # a slot never written: scale 0
    users[2].hidden[:] = 0.0  # a new user's GRU state
    users[3].hidden[5] = -users[3].hidden[5] * 100  # one entry far from the others
    users[4].memory_values = users[4].memory_values.astype(np.float64)  # another dtype in the batch
    assert encode_many(users, precision) == [encode(user, precision) for user in users]
    assert encode_many(users[:1], precision) == [encode(users[0], precision)] and encode_many([], precision) == []
    # Users of different shapes (a checkpoint with other sizes) are still each encoded as alone.
    other = sample_user(relations=4, kb_dim=8, hidden=16)
    assert encode_many([users[0], other], precision) == [encode(users[0], precision), encode(other, precision)]
    # States without memory (the GRU4Rec ablation).
    bare = [sample_user(relations=0, kb_dim=0) for _ in range(3)]
    for user in bare:
        user.memory_values = np.zeros((0, 0), np.float32)
    assert encode_many(bare, precision) == [encode(user, precision) for user in bare]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x01\x00", "shorter than its header"),
        (b"\x09" + encode(sample_user())[1:], "format 9"),
        (encode(sample_user())[:-3], "header implies"),
    ],
)
def test_corrupt_state_is_reported(blob: bytes, message: str) -> None:
    with pytest.raises(StateDecodeError, match=message):
        decode(blob)


def test_the_last_events_position_round_trips_and_format_1_still_reads() -> None:
    import struct

    from worker.state import _HEADER

    user = sample_user()
    assert (decode(encode(user)).last_partition, decode(encode(user)).last_offset) == (-1, -1)
    user.last_partition, user.last_offset = 3, 2**40 + 5
    back = decode(encode(user, "int8"))
    assert (back.last_partition, back.last_offset) == (3, 2**40 + 5)
    # A state written by format 1 (no position; header "<BBIId5H"): everything else as before.
    blob = encode(user)
    fields = _HEADER.unpack_from(blob)  # version, precision, model, events, ts, partition, offset, 5 sizes
    v1 = struct.pack("<BBIId5H", 1, *fields[1:5], *fields[7:]) + blob[_HEADER.size :]
    old = decode(v1)
    assert (old.last_partition, old.last_offset) == (-1, -1)
    assert np.array_equal(old.hidden, user.hidden) and old.recent_ids == user.recent_ids
    assert old.history.tolist() == user.history.tolist() and old.events == user.events


def test_event_id_hash_is_stable_across_processes() -> None:
    # A fixed value: Python's hash() is salted per process and would break deduplication.
    assert event_id_hash("ml-100k:0") == event_id_hash("ml-100k:0")
    assert event_id_hash("ml-100k:0") == int.from_bytes(
        __import__("hashlib").blake2b(b"ml-100k:0", digest_size=8).digest(), "little"
    )


def test_the_settings_and_checkpoint_limits_are_what_the_state_header_holds() -> None:
    """KSR_HISTORY_LENGTH and KSR_RECENT_EVENT_IDS stop at STATE_COUNT_MAX, and a checkpoint's
    version at VERSION_MAX, because the header stores them in 16 and 32 bits: a state at each limit
    round-trips, and one past it cannot be written."""
    import dataclasses
    import struct

    from model.checkpoint import VERSION_MAX
    from worker.config import STATE_COUNT_MAX

    limits = dataclasses.replace(
        sample_user(), model_version=VERSION_MAX, history=np.arange(STATE_COUNT_MAX, dtype=np.int32),
        recent_ids=list(range(STATE_COUNT_MAX)))
    back = decode(encode(limits))
    assert back.model_version == VERSION_MAX
    assert len(back.history) == STATE_COUNT_MAX and back.history[-1] == STATE_COUNT_MAX - 1
    assert back.recent_ids == list(range(STATE_COUNT_MAX))
    for past in ({"model_version": VERSION_MAX + 1},
                 {"history": np.arange(STATE_COUNT_MAX + 1, dtype=np.int32)},
                 {"recent_ids": list(range(STATE_COUNT_MAX + 1))}):
        with pytest.raises(struct.error):
            encode(dataclasses.replace(limits, **past))
