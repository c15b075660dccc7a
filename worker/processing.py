"""What the worker does with a batch of raw interaction events, without Kafka.

`validate` turns raw bytes into an `Interaction` or a `Rejection` with a reason (for the dead-letter
topic). `BatchProcessor.process` runs a batch: load user states, drop replayed duplicates, one
model forward over every user's events of the batch from their stored states (the same as one
step per event, in order), top-k minus seen items, new states to store. The Faust agent only
moves bytes between Kafka, the table and this module.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
import torch

from model.ksr import UserState
from model.serving import Recommender
from worker.state import StoredUser, event_id_hash, to_tensors

MAX_ID_LENGTH = 256
# A dead letter keeps at most this much of the original value (its source coordinates point at the
# whole of it), so a dead letter stays small whatever arrives: a 10 MB value included.
ORIGINAL_PREFIX_BYTES = 4096
_ORIGINAL_JSON_BYTES = 2 * ORIGINAL_PREFIX_BYTES  # text that escapes to more is kept as base64
_KEY_PREFIX_BYTES = 256
_DETAIL_JSON_BYTES = 2048


@dataclass(frozen=True)
class Interaction:
    """A valid event: `user_id` consumed `item_id` at `ts` (epoch seconds)."""

    user_id: str
    item_id: str
    ts: float
    event_id: str | None = None
    type: str | None = None


@dataclass(frozen=True)
class Rejection:
    """Why an event cannot be used; `reason` is a short stable code, `detail` says more."""

    reason: str
    detail: str


def _encodable(text: str) -> bool:
    """Whether `text` is valid Unicode (JSON's \\ud800 escapes can smuggle in lone surrogates,
    which would fail later, when the id is encoded as a Kafka key or hashed)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _preview(value: object, limit: int = 50) -> str:
    """A short printable rendering of any parsed JSON value, for a rejection's detail."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<integer of {value.bit_length()} bits>"
    try:
        return repr(value)[:limit]
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _identifier(value: object, name: str, unicode_checked: bool = False) -> str | Rejection:
    """An id as text, or why it cannot be one. `unicode_checked`: a string from orjson, which
    refuses lone surrogates, so the encoding check is skipped."""
    if unicode_checked and type(value) is str and 0 < len(value) <= MAX_ID_LENGTH:
        return value  # the common case, without the checks below
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return Rejection(f"bad_{name}", f"{name} must be a string or integer, got {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > 4 * MAX_ID_LENGTH:  # far more than 256 digits
        return Rejection(f"bad_{name}", f"{name} must have 1 to {MAX_ID_LENGTH} characters")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH:
        return Rejection(f"bad_{name}", f"{name} must have 1 to {MAX_ID_LENGTH} characters")
    if not _encodable(text):
        return Rejection(f"bad_{name}", f"{name} is not valid Unicode (lone surrogate)")
    return text


def validate(raw: bytes | None, max_bytes: int) -> Interaction | Rejection:
    """Check one event against the `interactions` schema of DESIGN.md.

    Never raises: whatever the bytes, the answer is an Interaction or a Rejection with a reason.
    """
    if raw is None:
        return Rejection("empty", "message has no value")
    if len(raw) > max_bytes:
        return Rejection("oversized", f"message of {len(raw)} bytes exceeds the {max_bytes}-byte limit")
    unicode_checked = True  # by orjson
    try:
        try:
            # orjson parses well-formed events several times faster; whatever it refuses (NaN,
            # integers beyond 64 bits, lone surrogates, UTF-16, nesting deeper than 1,024, ...)
            # goes to the standard parser, so the outcome and the reasons stay the same.
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            unicode_checked = False
            payload = json.loads(raw)
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers of more than
        # sys.get_int_max_str_digits() digits; RecursionError, nesting too deep to parse.
        return Rejection("not_json", f"not JSON: {str(error)[:200]}")
    if not isinstance(payload, dict):
        return Rejection("not_object", f"expected a JSON object, got {type(payload).__name__}")
    for name in ("user_id", "item_id", "ts"):
        if name not in payload:
            return Rejection(f"missing_{name}", f"required field {name!r} is missing")
    user_id = _identifier(payload["user_id"], "user_id", unicode_checked)
    if isinstance(user_id, Rejection):
        return user_id
    item_id = _identifier(payload["item_id"], "item_id", unicode_checked)
    if isinstance(item_id, Rejection):
        return item_id
    ts = payload["ts"]
    try:
        seconds = float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else math.nan
    except OverflowError:  # an integer beyond float's range
        seconds = math.nan
    if not math.isfinite(seconds):
        return Rejection("bad_ts", f"ts must be a finite number of epoch seconds, got {_preview(ts)}")
    event_id = payload.get("event_id")
    if event_id is not None:
        event_id = _identifier(event_id, "event_id", unicode_checked)
        if isinstance(event_id, Rejection):
            return event_id
    event_type = payload.get("type")
    if event_type is not None and not isinstance(event_type, str):
        return Rejection("bad_type", f"type must be a string, got {type(event_type).__name__}")
    if event_type is not None and (len(event_type) > MAX_ID_LENGTH or not _encodable(event_type)):
        return Rejection("bad_type", f"type must be valid Unicode of at most {MAX_ID_LENGTH} characters")
    return Interaction(user_id, item_id, seconds, event_id, event_type)


@dataclass
class Source:
    """Where an event came from: its Kafka key, raw bytes and coordinates."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: float  # Kafka message timestamp, epoch seconds


@dataclass
class BatchResult:
    """What a batch produced: messages to send, states to store, and counts for metrics."""

    # Each output carries the partition of the event it answers, so that it goes to that partition
    # number and joins that partition's transaction.
    recommendations: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (partition, key, value)
    dead_letters: list[tuple[int, bytes | None, bytes, str]] = field(default_factory=list)  # (.., reason)
    states: dict[str, tuple[int, StoredUser]] = field(default_factory=dict)  # user -> (partition, state)
    duplicates: int = 0
    answered_duplicates: int = 0  # of the duplicates, those answered again (at-least-once)
    new_users: int = 0
    recomputed_users: int = 0
    ranked_again: int = 0  # answers the int8 ranking did not certify at first, ranked again
    rounds: int = 0  # sequential model steps: the most events any one user had in the batch
    step_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # event timestamp -> emit, seconds


def _json_bytes(value: object) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (only possible in text we did not validate) becomes its
    \\uXXXX escape, which is what it means in JSON."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _clip(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose JSON string form takes at most `max_bytes` bytes."""
    size = len(_json_bytes(text))
    while text and size > max_bytes:
        # Shrink in proportion to the overshoot (an escaped control character takes 6 bytes).
        text = text[: min(len(text) - 1, len(text) * max_bytes // size)]
        size = len(_json_bytes(text))
    return text


def _original_text(prefix: bytes, truncated: bool) -> str | None:
    """`prefix` as UTF-8 text (a character cut by the truncation dropped), or None when not text."""
    try:
        return prefix.decode("utf-8")
    except UnicodeDecodeError as error:
        # Only a multi-byte character cut off at the very end is forgiven, and only after a cut.
        if truncated and error.start >= len(prefix) - 3 and error.reason == "unexpected end of data":
            return prefix[: error.start].decode("utf-8")
        return None


def dead_letter(source: Source, reason: str, detail: str) -> bytes:
    """The dead-letter message: reason, the original (its first ORIGINAL_PREFIX_BYTES bytes, as text
    or base64) and its coordinates: about 11 KiB at most, whatever the original's size."""
    import base64

    value = source.value or b""
    truncated = len(value) > ORIGINAL_PREFIX_BYTES
    prefix = value[:ORIGINAL_PREFIX_BYTES]
    original = _original_text(prefix, truncated)
    encoding = "utf-8"
    if original is None or len(_json_bytes(original)) > _ORIGINAL_JSON_BYTES:
        # Not UTF-8, or text made mostly of control characters that JSON escapes: base64 is smaller.
        original = base64.b64encode(prefix).decode("ascii")
        encoding = "base64"
    key = source.key or b""
    return _json_bytes({
        "reason": reason,
        "detail": _clip(detail, _DETAIL_JSON_BYTES),
        "original": original,
        "original_encoding": encoding,
        "original_bytes": len(value),
        "original_truncated": truncated,
        "original_key": _clip(key[:_KEY_PREFIX_BYTES].decode("utf-8", "replace"), 4 * _KEY_PREFIX_BYTES),
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
        "dead_lettered_ts": time.time(),
    })


class BatchProcessor:
    """Runs batches of events through a Recommender; holds no Kafka objects."""

    def __init__(
        self,
        recommender: Recommender,
        top_k: int = 10,
        history_length: int = 1000,
        recent_event_ids: int = 32,
        max_event_bytes: int = 64 * 1024,
        answer_duplicates: bool = False,
    ) -> None:
        self.recommender = recommender
        self._state_shapes: tuple | None = None  # a state's shapes under the model, when first needed
        # At-least-once: a redelivered event whose id the user's state already holds may never
        # have been answered (the process died between the state write and the send), so it is
        # answered again from the user's current state; the state does not take it twice.
        self.answer_duplicates = answer_duplicates
        self.top_k = top_k
        self.history_length = history_length
        self.recent_event_ids = recent_event_ids
        self.max_event_bytes = max_event_bytes

    def swap(self, recommender: Recommender) -> None:
        """Serve a new model from the next batch on."""
        self.recommender = recommender
        self._state_shapes = None

    def _shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one user's GRU state and memory values under the current model."""
        if self._state_shapes is None:
            initial = self.recommender.initial_state(1)
            self._state_shapes = (tuple(initial.hidden.shape[1:]), tuple(initial.memory_values.shape[1:]))
        return self._state_shapes

    def new_user(self) -> StoredUser:
        """State of a user with no events under the current model: the model's initial state (zero
        GRU state, empty memory), made in NumPy from its shapes (every event is a new user's at
        scale, and three tensors made and converted per user cost more than the arrays)."""
        hidden, memory = self._shapes()
        return StoredUser(
            model_version=self.recommender.version, events=0, last_ts=0.0,
            hidden=np.zeros(hidden, np.float32), memory_values=np.zeros(memory, np.float32),
            evidence=np.zeros(memory[:1], np.float32), history=np.zeros(0, dtype=np.int32), recent_ids=[],
        )

    def process(
        self, batch: Sequence[Source], load: Callable[[str, int], StoredUser | None]
    ) -> BatchResult:
        """Process a batch in order; `load(user_id, partition)` returns the user's stored state in
        the partition of its event (where its state is written), or None."""
        result = BatchResult()
        catalog = self.recommender.item_index
        accepted: list[tuple[Source, Interaction, int]] = []
        for source in batch:
            event = validate(source.value, self.max_event_bytes)
            # Index 0 is the padding row ([PAD]): a token of the catalog, but never an item.
            if isinstance(event, Interaction) and not catalog.get(event.item_id):
                event = Rejection("unknown_item", f"item_id {event.item_id!r} is not in the model's catalog")
            elif isinstance(event, Interaction) and source.key != event.user_id.encode():
                # A user's events must share one partition: the user's state, its changelog record
                # and the offset that makes a redelivery harmless all live in the partition of the
                # user's key. Under another key (or none) the same user would be served from two
                # partitions, and a redelivered event could be applied twice.
                event = Rejection("key_mismatch", "the message key must be the user_id in UTF-8, got "
                                  + ("no key" if source.key is None else _preview(source.key)))
            if isinstance(event, Rejection):
                result.dead_letters.append(
                    (source.partition, source.key, dead_letter(source, event.reason, event.detail), event.reason)
                )
                continue
            accepted.append((source, event, catalog[event.item_id]))

        users: dict[str, StoredUser] = {}
        stale: list[str] = []
        for source, event, _ in accepted:
            if event.user_id in users:
                continue
            stored = load(event.user_id, source.partition)
            if stored is None:
                stored = self.new_user()
                result.new_users += 1
            elif (stored.model_version != self.recommender.version
                  or (stored.hidden.shape, stored.memory_values.shape) != self._shapes()):
                # Computed by another model: its version, or (a checkpoint replaced by another
                # training, which starts at version 1 again) its sizes differ. Recomputed from
                # the user's item history under this one.
                stale.append(event.user_id)
            users[event.user_id] = stored
        if stale:
            self._recompute(users, stale)
            result.recomputed_users += len(stale)

        # Each user's fresh events of this batch, in order. A duplicate is dropped: a redelivered
        # event (its partition's offset at or below the last one applied to the user: a user's
        # events come from one partition in offset order, so this holds however many came again)
        # or a replayed one (an event id among the user's recent ids, this batch's earlier events
        # included; the same event produced twice has two offsets).
        positions: dict[str, list[int]] = {}  # user -> the indices of its events in `emitted`
        partition_of: dict[str, int] = {}
        emitted: list[tuple[Source, Interaction, int]] = []
        fresh: dict[str, list[int]] = {}  # user -> the item indices of its fresh events, in order
        # Each answer's seen filter is the user's history as of its event: (user, fresh events of
        # the batch by then), made into views of one array per user after the loop.
        seen_at: list[tuple[str, int]] = []
        again: list[tuple[Source, Interaction, int]] = []  # duplicates to answer again
        again_states: list[StoredUser] = []
        again_seen_at: list[tuple[str, int]] = []
        for entry in accepted:
            source, event, index = entry
            user = users[event.user_id]
            partition_of[event.user_id] = source.partition
            items = fresh.setdefault(event.user_id, [])
            hashed = None if event.event_id is None else event_id_hash(event.event_id)
            if (source.partition == user.last_partition and source.offset <= user.last_offset) or (
                    hashed is not None and hashed in user.recent_ids):
                result.duplicates += 1
                if self.answer_duplicates:
                    # The state as stored before this batch, the history as of this event.
                    again.append(entry)
                    again_states.append(user)
                    again_seen_at.append((event.user_id, len(items)))
                continue
            if hashed is not None:
                user.recent_ids = (user.recent_ids + [hashed])[-self.recent_event_ids :]
            user.last_partition, user.last_offset = source.partition, source.offset
            items.append(index)
            user.events += 1
            user.last_ts = event.ts
            positions.setdefault(event.user_id, []).append(len(emitted))
            emitted.append(entry)
            seen_at.append((event.user_id, len(items)))
        seen, again_seen = self._histories(users, fresh, seen_at, again_seen_at)
        if again:
            # Before _run, which moves the users' states past this batch's fresh events.
            started = time.perf_counter()
            user_vectors, weights = self.recommender.user_vectors(UserState(*to_tensors(again_states)))
            result.step_seconds += time.perf_counter() - started
            self._emit(again, user_vectors, weights, again_seen, result)
            result.answered_duplicates = len(again)
        if emitted:
            self._run(emitted, positions, users, seen, result)
        result.states = {u: (partition_of[u], users[u]) for u in users}
        return result

    def _histories(
        self, users: dict[str, StoredUser], fresh: dict[str, list[int]], *wanted: list[tuple[str, int]]
    ) -> list[list[np.ndarray]]:
        """Append each user's fresh items to its stored history (the last `history_length` kept),
        and return, for each list of (user, n) in `wanted`, the history as of the user's n-th fresh
        event of the batch: read-only views of one array per user, made once per batch instead of
        one copy per event."""
        limit = self.history_length
        full: dict[str, tuple[np.ndarray, int]] = {}
        for user_id, items in fresh.items():
            user = users[user_id]
            before = len(user.history)
            combined = user.history
            if items:
                combined = np.concatenate([combined, np.asarray(items, dtype=np.int32)])
                combined.flags.writeable = False  # shared by this batch's answers
            full[user_id] = combined, before
            user.history = combined[-limit:]

        def as_of(user_id: str, n: int) -> np.ndarray:
            combined, before = full[user_id]
            end = before + n
            return combined[max(0, end - limit) : end]

        return [[as_of(user_id, n) for user_id, n in positions] for positions in wanted]

    def _recompute(self, users: dict[str, StoredUser], stale: list[str]) -> None:
        """Rebuild GRU state and memory from the stored last-N items under the current model."""
        state = self.recommender.replay([users[u].history for u in stale])
        self._take_rows(state, [users[u] for u in stale])

    def _take_rows(self, state: UserState, users: list[StoredUser]) -> None:
        """Give each user its row of a batch's states, under the current model. The arrays are
        converted once and each user holds views of its rows: a tensor's row and its conversion,
        three per user, cost about as much as the forward itself when every event is a new user's."""
        hidden, memory_values, evidence = state.hidden.numpy(), state.memory_values.numpy(), state.evidence.numpy()
        version = self.recommender.version
        for row, user in enumerate(users):
            user.hidden = hidden[row]
            user.memory_values = memory_values[row]
            user.evidence = evidence[row]
            user.model_version = version

    def _run(
        self,
        emitted: list[tuple[Source, Interaction, int]],
        positions: dict[str, list[int]],
        users: dict[str, StoredUser],
        seen: list[np.ndarray],
        result: BatchResult,
    ) -> None:
        """Run every fresh event of the batch through the model at once and rank each.

        The users' events form a (users, steps) block, run by one forward from their stored
        states (one GRU call over all steps; the memory write loops over the steps), which equals
        stepping the events one at a time (tests/test_ksr.py). A batch of a few users with many
        events each, as sessions produce, so costs one call instead of one step per event.
        """
        order = list(positions)
        stored = [users[u] for u in order]
        steps = max(len(p) for p in positions.values())
        items = np.zeros((len(order), steps), dtype=np.int64)
        cells = np.empty(len(emitted), dtype=np.int64)  # each emitted event's row * steps + t
        for row, user_id in enumerate(order):
            mine = positions[user_id]
            items[row, : len(mine)] = [emitted[p][2] for p in mine]
            cells[mine] = row * steps + np.arange(len(mine))
        lengths = torch.tensor([len(positions[u]) for u in order])
        started = time.perf_counter()
        user_vectors, weights, final = self.recommender.run(
            UserState(*to_tensors(stored)), torch.from_numpy(items), lengths
        )
        result.step_seconds += time.perf_counter() - started
        result.rounds += steps
        self._take_rows(final, stored)
        cells_t = torch.from_numpy(cells)
        self._emit(
            emitted,
            user_vectors.reshape(-1, user_vectors.shape[-1])[cells_t],
            weights.reshape(-1, weights.shape[-1])[cells_t],
            seen,
            result,
        )

    def _emit(
        self,
        entries: list[tuple[Source, Interaction, int]],
        user_vectors: torch.Tensor,
        weights: torch.Tensor,
        seen: list[np.ndarray],
        result: BatchResult,
    ) -> None:
        """Rank every event of the batch at once and build its recommendation message."""
        started = time.perf_counter()
        before = self.recommender.ranked_again
        recommendations = self.recommender.rank_vectors(user_vectors, weights, seen, self.top_k)
        result.step_seconds += time.perf_counter() - started
        result.ranked_again += self.recommender.ranked_again - before
        emitted = time.time()
        version = self.recommender.version
        for (source, event, _), rec in zip(entries, recommendations):
            message = {
                "user_id": event.user_id,
                "items": rec.items,
                "scores": rec.scores,
                "model_version": version,
                "explanation": rec.explanation,
                "event_id": event.event_id,
                "event_ts": event.ts,
                "emitted_ts": emitted,
            }
            result.recommendations.append(
                # orjson: a fraction of json.dumps's time for this message (README, Speed); the
                # ids were checked to be valid Unicode and the floats are finite.
                (source.partition, event.user_id.encode(), orjson.dumps(message))
            )
            result.latencies.append(max(0.0, emitted - source.timestamp))
