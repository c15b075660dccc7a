"""Hostile input: whatever bytes arrive on `interactions`, the worker keeps running and every event
it cannot use lands in the dead-letter topic with a reason.

The pure-logic tests drive `validate` and `dead_letter` with hypothesis; the broker test sends
10,000 hypothesis-generated payloads (10 MB values among them) through a real `ksr worker`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import time
import warnings

import pytest
from conftest import WorkerProcess, consume, decode, scrape, stream_env
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from worker.processing import (
    MAX_ID_LENGTH,
    ORIGINAL_PREFIX_BYTES,
    Interaction,
    Rejection,
    Source,
    dead_letter,
    validate,
)
from worker.state import event_id_hash

MAX_EVENT_BYTES = 64 * 1024
DEAD_LETTER_LIMIT = 16 * 1024
REASONS = {
    "empty", "not_json", "not_object", "oversized", "unknown_item",
    *(f"missing_{f}" for f in ("user_id", "item_id", "ts")),
    *(f"bad_{f}" for f in ("user_id", "item_id", "ts", "event_id", "type")),
}

# --------------------------------------------------------------------------- strategies

# Any code point, lone surrogates included (JSON's \ud800 escapes can carry them).
ANY_CHAR = st.characters() | st.characters(categories=["Cs"])
ANY_TEXT = st.text(ANY_CHAR, max_size=40)
JSON_LEAF = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**1000)
    | st.floats() | ANY_TEXT
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4),
    max_leaves=12,
)
# Numbers that stretch the parser: beyond float range, beyond the 4,300-digit int limit, NaN.
WEIRD_NUMBERS = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "1" + "0" * 400, "9" * 4300,
    "9" * 5000, "-" + "9" * 6000, "0.000000001", "-0", "1E+308", "123456789012345678901234567890",
])
IDENTIFIER = (
    ANY_TEXT | st.text(ANY_CHAR, min_size=250, max_size=300) | st.integers()
    | st.integers(min_value=10**250, max_value=10**300) | JSON_VALUE
)
TS = st.floats() | st.integers() | st.integers(min_value=2**1024, max_value=2**1100) | JSON_VALUE


def _dumps(value) -> bytes:
    """JSON text as a producer would send it (NaN/Infinity literals, \\uXXXX escapes)."""
    return json.dumps(value).encode()


@st.composite
def wrong_shape_events(draw) -> bytes:
    """Objects with (some of) the right keys and values of any type."""
    fields = draw(st.fixed_dictionaries(
        {}, optional={"user_id": IDENTIFIER, "item_id": IDENTIFIER, "ts": TS, "event_id": IDENTIFIER,
                      "type": IDENTIFIER, "extra": JSON_VALUE},
    ))
    return _dumps(fields)


@st.composite
def raw_number_events(draw) -> bytes:
    """An event whose user_id, item_id, ts or event_id is a number literal no json.dumps writes."""
    field = draw(st.sampled_from(["user_id", "item_id", "ts", "event_id"]))
    number = draw(WEIRD_NUMBERS)
    fields = {"user_id": '"u"', "item_id": '"50"', "ts": "1.0", field: number}
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


@st.composite
def reencoded_events(draw, items: st.SearchStrategy) -> bytes:
    """A plausible event, then mangled at the byte level: BOM, UTF-16/32, duplicated keys,
    truncation, trailing garbage, deep nesting, control characters."""
    event = {"user_id": draw(ANY_TEXT | st.integers()), "item_id": draw(items), "ts": draw(TS)}
    text = json.dumps(event)
    how = draw(st.sampled_from(["bom", "utf-16", "utf-32", "dup", "cut", "garbage", "nest", "nul"]))
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how in ("utf-16", "utf-32"):
        return text.encode(how)
    if how == "dup":  # duplicated keys: the last one wins
        return (text[:-1] + ', "user_id": ' + json.dumps(draw(IDENTIFIER)) + "}").encode()
    if how == "cut":
        return text.encode()[: draw(st.integers(0, len(text) - 1))]
    if how == "garbage":
        return text.encode() + draw(st.binary(min_size=1, max_size=8))
    if how == "nest":
        depth = draw(st.integers(1, 30_000))
        return b'{"user_id": ' + b"[" * depth + b"]" * depth + b', "item_id": "1", "ts": 1}'
    return text.replace('"', '"\x00', 1).encode()


def valid_events(items: st.SearchStrategy, users: st.SearchStrategy) -> st.SearchStrategy:
    """Well-formed events; event ids from a small pool, so replayed duplicates happen."""
    return st.builds(
        lambda user, item, ts, event_id, kind: _dumps(
            {"user_id": user, "item_id": item, "ts": ts,
             **({"event_id": event_id} if event_id is not None else {}),
             **({"type": kind} if kind is not None else {})}),
        users, items, st.floats(0, 2e9, allow_nan=False),
        st.none() | st.integers(0, 40).map(lambda n: f"e-{n}"), st.none() | st.just("rating"),
    )


def at_the_cap(size: int) -> bytes:
    """A JSON object (without user_id) of exactly `size` bytes."""
    return b"{" + b" " * (size - 2) + b"}"


def payloads(items: st.SearchStrategy, users: st.SearchStrategy, cap: bool = True) -> st.SearchStrategy:
    """Any of the above, plus arbitrary bytes, arbitrary JSON and (`cap`) values at the size cap."""
    return st.one_of(
        st.binary(max_size=300),
        JSON_VALUE.map(_dumps),
        wrong_shape_events(),
        raw_number_events(),
        reencoded_events(items),
        valid_events(items, users),
        *([st.integers(MAX_EVENT_BYTES - 1, MAX_EVENT_BYTES + 1).map(at_the_cap)] if cap else []),
    )


# Ids that look like catalog items (the broker test passes the real catalog instead).
SOME_ITEMS = st.sampled_from(["50", "172", "181", "[PAD]", "0", "99999"]) | st.integers(-5, 2000)
SOME_USERS = ANY_TEXT | st.integers()


def check_outcome(raw: bytes | None, result: Interaction | Rejection) -> None:
    if isinstance(result, Rejection):
        assert result.reason in REASONS, result
        assert isinstance(result.detail, str) and result.detail, result
        return
    assert isinstance(result, Interaction), result
    assert isinstance(result.ts, float) and math.isfinite(result.ts)
    for value in (result.user_id, result.item_id, result.event_id):
        if value is None:
            continue
        assert isinstance(value, str) and 1 <= len(value) <= MAX_ID_LENGTH
        value.encode("utf-8")  # no lone surrogates: ids become Kafka keys and hash inputs
    if result.type is not None:  # free text, possibly empty
        assert isinstance(result.type, str) and len(result.type) <= MAX_ID_LENGTH
        result.type.encode("utf-8")
    assert raw is not None and len(raw) <= MAX_EVENT_BYTES


# --------------------------------------------------------------------------- pure logic

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.none() | payloads(SOME_ITEMS, SOME_USERS))
def test_validate_never_raises_and_always_says_why(raw) -> None:
    check_outcome(raw, validate(raw, MAX_EVENT_BYTES))


@FAST
@given(st.binary(max_size=2000))
def test_validate_arbitrary_bytes(raw: bytes) -> None:
    check_outcome(raw, validate(raw, MAX_EVENT_BYTES))


@FAST
@given(wrong_shape_events() | raw_number_events())
def test_validate_right_keys_wrong_types(raw: bytes) -> None:
    result = validate(raw, MAX_EVENT_BYTES)
    check_outcome(raw, result)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"user_id": "1", "item_id": "1", "ts": 1' + b"0" * 5000 + b"}", "not_json"),  # > 4300 digits
        (b'{"user_id": "1", "item_id": "1", "ts": 1' + b"0" * 400 + b"}", "bad_ts"),  # int > float max
        (b'{"user_id": "1", "item_id": "1", "ts": 1e400}', "bad_ts"),
        (b'{"user_id": "1", "item_id": "1", "ts": -Infinity}', "bad_ts"),
        (b'{"user_id": 1' + b"0" * 4000 + b', "item_id": "1", "ts": 1}', "bad_user_id"),
        (b'{"user_id": "\\ud800", "item_id": "1", "ts": 1}', "bad_user_id"),
        (b'{"user_id": "1", "item_id": "\\udfff", "ts": 1}', "bad_item_id"),
        (b'{"user_id": "1", "item_id": "1", "ts": 1, "event_id": "\\ud83d"}', "bad_event_id"),
        (b'{"user_id": "1", "item_id": "1", "ts": 1, "type": "\\ud83d"}', "bad_type"),
        (b'{"user_id": "1", "item_id": "1", "ts": 1, "type": "' + b"t" * 300 + b'"}', "bad_type"),
        (b'{"user_id": "1", "item_id": "1", "ts": 1, "user_id": null}', "bad_user_id"),
        (b"", "not_json"),
        (b"\xef\xbb\xbf", "not_json"),
        (b"[" * 30000 + b"]" * 30000, "not_json"),
    ],
)
def test_inputs_that_used_to_escape_validate(raw: bytes, reason: str) -> None:
    result = validate(raw, MAX_EVENT_BYTES)
    assert isinstance(result, Rejection) and result.reason == reason, result
    assert result.detail


@pytest.mark.parametrize("parser", ["orjson", "json"])
def test_id_lengths_at_the_limit_either_parser(parser: str) -> None:
    """The same bounds whichever parser read the event (NaN in `extra` sends it to json.loads)."""
    extra = ', "extra": NaN' if parser == "json" else ""
    for name in ("user_id", "item_id", "event_id"):
        for length, accepted in ((1, True), (MAX_ID_LENGTH, True), (MAX_ID_LENGTH + 1, False), (0, False)):
            fields = {"user_id": "u", "item_id": "i", "ts": 1, name: "x" * length}
            raw = (json.dumps(fields)[:-1] + extra + "}").encode()
            result = validate(raw, MAX_EVENT_BYTES)
            if accepted:
                assert isinstance(result, Interaction) and getattr(result, name) == "x" * length
            else:
                assert isinstance(result, Rejection) and result.reason == f"bad_{name}", result


def test_bom_and_surrogate_pairs_are_accepted() -> None:
    assert validate(b'\xef\xbb\xbf{"user_id": "1", "item_id": "1", "ts": 1}', 1024) == Interaction("1", "1", 1.0)
    # A proper escaped pair is one astral character, not a lone surrogate.
    result = validate(b'{"user_id": "\\ud83d\\ude00", "item_id": "1", "ts": 1}', 1024)
    assert result == Interaction("\U0001f600", "1", 1.0)


KEYS = st.none() | st.binary(max_size=64) | st.binary(min_size=2000, max_size=5000)
VALUES = (
    st.none() | st.binary(max_size=6000) | st.text(ANY_CHAR, max_size=3000).map(
        lambda t: t.encode("utf-8", "surrogatepass"))
    | st.integers(0, 10).map(lambda n: "\u00e9\x01😀".encode() * (n * 1000))
)


@FAST
@given(KEYS, VALUES, st.sampled_from(sorted(REASONS)), st.text(ANY_CHAR, max_size=5000))
def test_dead_letter_is_small_json_for_any_input(key, value, reason: str, detail: str) -> None:
    source = Source(key, value, "interactions", 3, 1234, 0.0)
    letter = dead_letter(source, reason, detail)
    assert isinstance(letter, bytes) and len(letter) < DEAD_LETTER_LIMIT
    message = json.loads(letter)
    size = len(value or b"")
    assert message["reason"] == reason and message["original_bytes"] == size
    assert message["original_truncated"] == (size > ORIGINAL_PREFIX_BYTES)
    assert message["source"] == {"topic": "interactions", "partition": 3, "offset": 1234}
    if message["original_encoding"] == "base64":
        kept = base64.b64decode(message["original"])
    else:
        assert message["original_encoding"] == "utf-8"
        kept = message["original"].encode()
    # The original, or a prefix of it (minus at most a character cut by the truncation).
    assert (value or b"").startswith(kept)
    assert len(kept) >= min(size, ORIGINAL_PREFIX_BYTES) - 3
    if not message["original_truncated"]:
        assert kept == (value or b"")


def test_dead_letter_of_a_10_mb_value_keeps_a_prefix() -> None:
    value = json.dumps({"user_id": "1", "item_id": "50", "ts": 1, "pad": "x" * 10_000_000}).encode()
    message = json.loads(dead_letter(Source(b"1", value, "t", 0, 7, 0.0), "oversized", "too big"))
    assert message["original_truncated"] is True and message["original_bytes"] == len(value)
    assert message["original_encoding"] == "utf-8"
    assert message["original"] == value[:ORIGINAL_PREFIX_BYTES].decode()
    # Non-Latin text stays readable text (UTF-8, not \\u escapes or base64).
    text = "Привет, мир. " * 1000
    message = json.loads(dead_letter(Source(None, text.encode(), "t", 0, 8, 0.0), "not_json", "x"))
    assert message["original_encoding"] == "utf-8" and text.startswith(message["original"])


def test_padding_item_is_not_a_catalog_item() -> None:
    """`[PAD]` is index 0 of every catalog: an event naming it is `unknown_item`, not item 0."""
    from worker.processing import BatchProcessor

    class Catalog:  # the only part of a Recommender that validation touches
        def __init__(self) -> None:
            self.item_index = {"[PAD]": 0, "50": 1}

    processor = BatchProcessor(Catalog())  # type: ignore[arg-type]
    source = Source(b"u", b'{"user_id": "u", "item_id": "[PAD]", "ts": 1}', "t", 0, 0, 0.0)
    result = processor.process([source], lambda user, _partition: None)
    assert [reason for *_, reason in result.dead_letters] == ["unknown_item"]
    assert not result.recommendations


def test_local_broker_takes_values_of_16_mib(tmp_path) -> None:
    """A 10 MB event must reach the worker (to be dead-lettered), not be refused by the broker."""
    from worker import broker

    props = broker.server_properties(port=1, controller_port=2, log_dir=tmp_path)
    assert int(props["message.max.bytes"]) >= 16 * 1024 * 1024
    assert int(props["replica.fetch.max.bytes"]) >= int(props["message.max.bytes"])


# --------------------------------------------------------------------------- the real worker

TOTAL = 10_000
HUGE = 10 * 1024 * 1024


def generate(catalog: list[str], seed: int = 20240601) -> list[tuple[bytes | None, bytes | None]]:
    """TOTAL (key, value) pairs from the hypothesis strategies above, plus a few 10 MB values.

    Hypothesis caps the data one example may draw, so many small examples fill one pool; only the
    generate phase runs (no shrinking or database), derandomized so that every run sends the same.
    """
    pool: list[tuple[bytes | None, bytes | None]] = []
    items = st.sampled_from(catalog) | st.sampled_from(catalog).map(int) | SOME_ITEMS
    users = st.sampled_from([f"hostile-{i}" for i in range(40)]) | st.integers(0, 50) | ANY_TEXT
    # Values at the cap come in at fixed places below: as one branch in eight they would be 30 MB.
    pair = st.tuples(st.none() | st.binary(max_size=64), st.none() | payloads(items, users, cap=False))
    weighted = st.one_of(pair, *[st.tuples(st.none(), valid_events(items, users))] * 2)

    class Full(Exception):
        """Raised to end the hypothesis run once the pool holds TOTAL payloads."""

    @settings(max_examples=TOTAL, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              print_blob=False, verbosity=Verbosity.quiet)
    @given(st.lists(weighted, min_size=1, max_size=40))
    def fill(batch) -> None:
        pool.extend(batch)
        if len(pool) >= TOTAL:
            raise Full

    with contextlib.suppress(Full), warnings.catch_warnings():
        warnings.simplefilter("ignore", HypothesisWarning)  # the "falsifying" example's long repr
        fill()
    assert len(pool) >= TOTAL, len(pool)
    rng = random.Random(seed)
    pool = pool[:TOTAL]
    huge = [
        json.dumps({"user_id": "1", "item_id": catalog[0], "ts": 1, "pad": "x" * HUGE}).encode(),
        rng.randbytes(HUGE),
        b"[" * HUGE,
    ]
    for value, position in zip(huge, (1000, 5000, 9000)):
        pool[position] = (b"huge", value)
    for offset in range(30):  # 10 each at the cap - 1, at the cap, one byte over
        pool[150 + 300 * offset] = (b"cap", at_the_cap(MAX_EVENT_BYTES - 1 + offset % 3))
    return pool


def expected_outcomes(pool, catalog: set[str], recent_event_ids: int = 32):
    """What the worker must do with each payload, computed the way BatchProcessor does: the
    reason for a dead letter, "ok", or "duplicate" (an event id among the user's last 32)."""
    recent: dict[str, list[int]] = {}
    outcomes = []
    for key, value in pool:
        result = validate(value, MAX_EVENT_BYTES)
        if isinstance(result, Interaction) and result.item_id not in catalog:
            result = Rejection("unknown_item", "")
        elif isinstance(result, Interaction) and key != result.user_id.encode():
            result = Rejection("key_mismatch", "")
        if isinstance(result, Rejection):
            outcomes.append(result.reason)
            continue
        ids = recent.setdefault(result.user_id, [])
        if result.event_id is not None and event_id_hash(result.event_id) in ids:
            outcomes.append("duplicate")
            continue
        if result.event_id is not None:
            ids[:] = (ids + [event_id_hash(result.event_id)])[-recent_event_ids:]
        outcomes.append("ok")
    return outcomes


@pytest.mark.broker
@pytest.mark.slow
def test_10000_hostile_payloads_through_the_worker(tmp_path, bootstrap, small_checkpoint) -> None:
    from kafka import KafkaProducer

    from model.checkpoint import load

    tokens = load(small_checkpoint).item_tokens
    catalog = [t for t in tokens if t != "[PAD]"]
    started = time.monotonic()
    pool = generate(catalog)
    # A valid event goes under its user's key (as any real producer does), so a user's events
    # stay in order on one partition; the rest keep whatever hostile key they drew.
    messages = []
    for key, value in pool:
        event = validate(value, MAX_EVENT_BYTES)
        if isinstance(event, Interaction):
            key = event.user_id.encode()
        elif value is None and key is None:
            key = b"tombstone"  # Kafka needs a key or a value
        messages.append((key, value))
    outcomes = expected_outcomes(messages, set(catalog))
    generated_s = time.monotonic() - started
    dead = [o for o in outcomes if o not in ("ok", "duplicate")]
    assert outcomes.count("ok") > 1000 and outcomes.count("duplicate") > 10 and len(dead) > 3000
    assert {"not_json", "not_object", "oversized", "empty", "unknown_item", "bad_ts"} <= set(dead)

    env = stream_env(tmp_path, bootstrap, small_checkpoint)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                 max_request_size=16 * 1024 * 1024)
        futures = [producer.send(env["KSR_TOPIC_INTERACTIONS"], key=k, value=v) for k, v in messages]
        producer.flush()
        producer.close()
        where = {}
        for index, future in enumerate(futures):
            metadata = future.get(timeout=30)
            where[(metadata.partition, metadata.offset)] = index

        raw_letters = consume(bootstrap, env["KSR_TOPIC_DLQ"], len(dead), timeout=120, worker=worker)
        recommendations = consume(bootstrap, env["KSR_TOPIC_RECOMMENDATIONS"], outcomes.count("ok"),
                                  timeout=120, worker=worker)
        time.sleep(2)  # anything beyond the expected counts would have arrived by now
        after = scrape(worker.metrics_url)
        assert worker.process.poll() is None, worker.log()[-3000:]
    finally:
        worker.stop()

    letters = decode(raw_letters)
    assert len(letters) == len(dead)
    assert len(recommendations) == outcomes.count("ok")
    for letter in letters:
        index = where[(letter["source"]["partition"], letter["source"]["offset"])]
        assert letter["reason"] == outcomes[index], (index, letter, messages[index][1][:200])
        assert letter["detail"] and letter["original_bytes"] == len(messages[index][1] or b"")
    assert max(len(record.value) for record in raw_letters) < DEAD_LETTER_LIMIT
    assert sum(1 for letter in letters if letter["original_bytes"] >= HUGE) == 3

    assert after['ksr_events_total{outcome="ok"}'] == outcomes.count("ok")
    assert after['ksr_events_total{outcome="dead_letter"}'] == len(dead)
    assert after['ksr_events_total{outcome="duplicate"}'] == outcomes.count("duplicate")
    assert sum(after[f'ksr_events_total{{outcome="{o}"}}'] for o in ("ok", "dead_letter", "duplicate")) == TOTAL
    for reason in set(dead):
        assert after[f'ksr_dead_letters_total{{reason="{reason}"}}'] == dead.count(reason), reason
    assert "Traceback" not in worker.log()
    print(f"generated {TOTAL} payloads in {generated_s:.1f} s; whole test {time.monotonic() - started:.1f} s")
