"""Event validation (pure logic; the dead-letter path on the broker is in test_worker.py)."""

from __future__ import annotations

import json

import pytest

from worker.processing import Interaction, Rejection, validate


def event(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_valid_event_is_normalised() -> None:
    result = validate(event(user_id=12, item_id="50", ts=874965758, event_id="e1", type="rating"), 1024)
    assert result == Interaction("12", "50", 874965758.0, "e1", "rating")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        (b"{", "not_json"),
        (b"\xff", "not_json"),
        (b"null", "not_object"),
        (b'"text"', "not_object"),
        (event(item_id="1", ts=1), "missing_user_id"),
        (event(user_id="1", ts=1), "missing_item_id"),
        (event(user_id="1", item_id="1"), "missing_ts"),
        (event(user_id=True, item_id="1", ts=1), "bad_user_id"),
        (event(user_id="", item_id="1", ts=1), "bad_user_id"),
        (event(user_id="u" * 300, item_id="1", ts=1), "bad_user_id"),
        (event(user_id="1", item_id=[1], ts=1), "bad_item_id"),
        (event(user_id="1", item_id=1.5, ts=1), "bad_item_id"),
        (event(user_id="1", item_id="1", ts="now"), "bad_ts"),
        (b'{"user_id": "1", "item_id": "1", "ts": NaN}', "bad_ts"),
        (b'{"user_id": "1", "item_id": "1", "ts": Infinity}', "bad_ts"),
        (event(user_id="1", item_id="1", ts=1, event_id={"x": 1}), "bad_event_id"),
        (event(user_id="1", item_id="1", ts=1, type=3), "bad_type"),
        (b"[" * 100000 + b"]" * 100000, "oversized"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(raw, reason: str) -> None:
    result = validate(raw, 64 * 1024)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail


def test_deeply_nested_json_under_the_size_cap_is_rejected_not_raised() -> None:
    result = validate(b"[" * 5000 + b"]" * 5000, 64 * 1024)
    assert isinstance(result, Rejection) and result.reason in {"not_json", "not_object"}
