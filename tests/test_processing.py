"""A batch through BatchProcessor answers every event as stepping it alone would (no Kafka here).

The processor runs a batch's events as one forward per batch from the users' stored states; the
reference below is `Recommender.advance`, one event at a time, as `ksr recommend` serves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.serving import Recommender
from worker.processing import BatchProcessor, Source
from worker.state import decode, encode


def _source(offset: int, user: str, item: str, event_id: str | None, partition: int = 0) -> Source:
    value = {"user_id": user, "item_id": item, "ts": 1000.0 + offset}
    if event_id is not None:
        value["event_id"] = event_id
    return Source(user.encode(), json.dumps(value).encode(), "interactions", partition, offset, 0.0)


@pytest.fixture(scope="module", params=[True, False], ids=["compiled", "torch"])
def recommender(small_checkpoint, request) -> Recommender:
    """Both serving kernels (KSR_SERVING_KERNEL): the compiled recurrence and PyTorch's forward."""
    return Recommender.load(small_checkpoint, compiled=request.param)


def test_a_new_users_state_is_the_models_initial_state(recommender: Recommender) -> None:
    processor = BatchProcessor(recommender)
    fresh, initial = processor.new_user(), recommender.initial_state(1)
    for mine, models in ((fresh.hidden, initial.hidden[0]), (fresh.memory_values, initial.memory_values[0]),
                         (fresh.evidence, initial.evidence[0])):
        models = models.numpy()
        assert mine.dtype == models.dtype and mine.shape == models.shape and np.array_equal(mine, models)
    assert fresh.model_version == recommender.version and fresh.events == 0 and len(fresh.history) == 0
    other = processor.new_user()  # its own arrays: one user's update never shows in another's
    other.hidden[0], other.memory_values[0, 0], other.evidence[0] = 1.0, 1.0, 1.0
    assert fresh.hidden[0] == fresh.memory_values[0, 0] == fresh.evidence[0] == 0.0


@torch.no_grad()
def test_batches_answer_as_one_event_at_a_time(recommender: Recommender) -> None:
    items = recommender.item_tokens[1:40]
    # Session-shaped batches: one user with many events, others interleaved, a user with a single
    # event, an event id replayed within the batch, one replayed from the previous batch, an unknown
    # item, and events without ids.
    first = [
        _source(0, "a", items[0], "e0"), _source(1, "a", items[1], "e1"), _source(2, "b", items[2], "e2"),
        _source(3, "a", items[3], None), _source(4, "c", items[4], "e4", partition=1),
        _source(5, "a", items[1], "e1"),  # replayed within the batch
        _source(6, "a", items[5], "e6"), _source(7, "b", items[6], "e7"),
    ]
    second = [
        _source(8, "b", items[7], "e7"),  # replayed from the previous batch
        _source(9, "d", items[8], "e9"), _source(10, "a", items[9], "e10"),
        _source(11, "a", "no-such-item", "e11"), _source(12, "a", items[10], "e12"),
        _source(13, "c", items[11], "e13", partition=1), _source(14, "a", items[12], "e14"),
    ]
    processor = BatchProcessor(recommender, top_k=10)
    table: dict[str, bytes] = {}

    def load(user_id: str, _partition: int):
        blob = table.get(user_id)
        return None if blob is None else decode(blob)

    answers = []
    dead = []
    for batch in (first, second):
        result = processor.process(batch, load)
        answers.extend(json.loads(value) for _, _, value in result.recommendations)
        dead.extend(reason for *_, reason in result.dead_letters)
        for user_id, (_, stored) in result.states.items():
            table[user_id] = encode(stored, "float32")
    assert dead == ["unknown_item"]

    # The reference: one event at a time through Recommender.advance.
    states, histories, expected = {}, {}, []
    done_ids: dict[str, set] = {}
    for source in first + second:
        event = json.loads(source.value)
        user, item, event_id = event["user_id"], event["item_id"], event.get("event_id")
        if item not in recommender.item_index or event_id in done_ids.setdefault(user, set()):
            continue
        if event_id is not None:
            done_ids[user].add(event_id)
        index = recommender.item_index[item]
        histories[user] = [*histories.get(user, []), index]
        state = states.get(user, recommender.initial_state(1))
        states[user], (rec,) = recommender.advance(state, torch.tensor([index]), [histories[user]], k=10)
        expected.append((user, event_id, rec))

    assert [(a["user_id"], a["event_id"]) for a in answers] == [(u, e) for u, e, _ in expected]
    for answer, (_, _, rec) in zip(answers, expected):
        assert answer["items"] == rec.items
        np.testing.assert_allclose(answer["scores"], rec.scores, atol=1e-5)
        assert [r["relation"] for r in answer["explanation"]] == [r["relation"] for r in rec.explanation]
        np.testing.assert_allclose([r["weight"] for r in answer["explanation"]],
                                   [r["weight"] for r in rec.explanation], atol=1e-5)
    for user, state in states.items():
        stored = decode(table[user])
        np.testing.assert_allclose(stored.hidden, state.hidden[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(stored.memory_values, state.memory_values[0].numpy(), atol=1e-5)
        assert stored.history.tolist() == histories[user]


@torch.no_grad()
def test_the_seen_filter_and_the_stored_history_keep_the_last_history_length_items(recommender: Recommender) -> None:
    """With KSR_HISTORY_LENGTH=3, each event excludes the user's last three items (its own
    included), across batch boundaries, and the stored history is the last three."""
    items = recommender.item_tokens[1:12]
    batches = [[_source(i, "a", items[i], f"e{i}") for i in range(5)],
               [_source(5, "a", items[5], "e5"), _source(6, "a", items[1], "e1"),  # a duplicate
                _source(7, "a", items[6], "e7")]]
    processor = BatchProcessor(recommender, top_k=10, history_length=3, answer_duplicates=True)
    table: dict[str, bytes] = {}
    answers = []
    for batch in batches:
        result = processor.process(batch, lambda u, _partition: decode(table[u]) if u in table else None)
        answers.extend(json.loads(value) for _, _, value in result.recommendations)
        table.update({u: encode(stored, "float32") for u, (_, stored) in result.states.items()})

    indices = [recommender.item_index[item] for item in items]
    state, expected, history = recommender.initial_state(1), {}, []
    for i in (0, 1, 2, 3, 4, 5, 6):
        history.append(indices[i])
        state, (rec,) = recommender.advance(state, torch.tensor([indices[i]]), [history[-3:]], k=10)
        expected[f"e{i if i < 6 else 7}"] = rec.items
    fresh = [a for a in answers if a["event_id"] != "e1" or a["event_ts"] == 1001.0]
    assert [a["event_id"] for a in fresh] == ["e0", "e1", "e2", "e3", "e4", "e5", "e7"]
    for answer in fresh:
        assert answer["items"] == expected[answer["event_id"]], answer["event_id"]
    # The duplicate is answered from the stored state with the history as of the event before it.
    again = next(a for a in answers if a["event_id"] == "e1" and a["event_ts"] != 1001.0)
    seen_then = {items[3], items[4], items[5]}
    assert not seen_then & set(again["items"])
    assert decode(table["a"]).history.tolist() == [indices[4], indices[5], indices[6]]


@torch.no_grad()
def test_an_event_under_another_key_is_dead_lettered_and_changes_no_state(recommender: Recommender) -> None:
    """A user's events must share the partition of the user's key: an event under no key or another
    user's key would be served from a second partition, where a redelivery is not recognised."""
    item = recommender.item_tokens[5]
    good = _source(0, "a", item, "e0")
    no_key = Source(None, good.value, "interactions", 1, 7, 0.0)
    other_key = Source(b"b", good.value.replace(b'"e0"', b'"e1"'), "interactions", 2, 8, 0.0)
    processor = BatchProcessor(recommender)
    result = processor.process([no_key, other_key], lambda user, _partition: None)
    assert [reason for *_, reason in result.dead_letters] == ["key_mismatch", "key_mismatch"]
    assert not result.states and not result.recommendations
    details = [json.loads(letter)["detail"] for _, _, letter, _ in result.dead_letters]
    assert details == ["the message key must be the user_id in UTF-8, got no key",
                       "the message key must be the user_id in UTF-8, got b'b'"]
    assert [json.loads(letter)["source"]["partition"] for _, _, letter, _ in result.dead_letters] == [1, 2]
    assert len(processor.process([good], lambda user, _partition: None).recommendations) == 1


@torch.no_grad()
def test_a_state_of_other_sizes_is_recomputed_not_stacked(recommender: Recommender) -> None:
    """A checkpoint replaced by another training starts at version 1 again: a state stored under the
    old one, with other sizes, is recomputed from the user's items instead of failing the batch."""
    import dataclasses

    processor = BatchProcessor(recommender)
    items = recommender.item_tokens[3:6]
    history = np.array(recommender.lookup(list(items[:2])), dtype=np.int32)
    fresh = processor.new_user()
    other = dataclasses.replace(fresh, hidden=np.zeros(3, np.float32), memory_values=np.zeros((2, 5), np.float32),
                                evidence=np.zeros(2, np.float32), history=history, events=2)
    result = processor.process([_source(0, "a", items[2], "e0")], lambda user, _partition: other)
    assert result.recomputed_users == 1 and len(result.recommendations) == 1
    state = result.states["a"][1]
    assert state.hidden.shape == fresh.hidden.shape and state.memory_values.shape == fresh.memory_values.shape
    expected = recommender.replay([[*history.tolist(), recommender.lookup([items[2]])[0]]])
    np.testing.assert_allclose(state.hidden, expected.hidden[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("k", [10, 100])  # 100: more than the catalog's 53 groups of 32 items
@pytest.mark.parametrize("block", [1, 64, 256, 1000, 4096])
@torch.no_grad()
def test_ranking_in_blocks_equals_ranking_the_whole_catalog(recommender: Recommender, monkeypatch, block, k) -> None:
    """A catalog larger than a block is ranked block by block (compiled: each block folded into a
    running top-k; torch: from its best groups of items): the same answer as scoring every item at
    once, seen items (in any block, the last one included) excluded. Blocks of 1,683 items
    (ml-100k) or more are one block; smaller ones exercise the block paths, with a last block that
    is not a whole number of groups."""
    generator = torch.Generator().manual_seed(0)
    n = recommender.n_items
    users = torch.randn(6, recommender.item_vectors.shape[1], generator=generator)
    seen = [[], [1, 2, 3], list(range(1, n, 2)), [n - 1, n - 2, 5], list(range(1, n - 3)), [7]]
    full = users @ recommender.item_vectors.T
    full[:, 0] = float("-inf")
    for row, items in enumerate(seen):
        full[row, items] = float("-inf")
    expected_scores, expected_items = torch.topk(full, k, dim=1)

    monkeypatch.setattr(recommender, "rank_block_items", block)
    monkeypatch.setattr(recommender, "rank_direct_max_batch", 0)  # these 6 users are ranked by blocks
    scores, items = recommender._top_k(users, seen, k)
    torch.testing.assert_close(scores, expected_scores)
    finite = torch.isfinite(expected_scores)
    assert torch.equal(items[finite], expected_items[finite])
    assert int((~finite).sum()) == k - 3  # the user who has seen all but 3 items gets only 3


@torch.no_grad()
def test_a_top_k_of_nothing_is_refused(recommender: Recommender) -> None:
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        recommender.rank(recommender.initial_state(1), [[]], k=0)


def _process(batches, processor: BatchProcessor) -> tuple[list, dict[str, bytes]]:
    """Run batches through `processor` as the agent does, with an in-memory table of encoded
    states: the batches' results and the table."""
    table: dict[str, bytes] = {}
    results = []
    for batch in batches:
        result = processor.process(batch, lambda u, _partition: None if u not in table else decode(table[u]))
        for user_id, (_, stored) in result.states.items():
            table[user_id] = encode(stored, "float32")
        results.append(result)
    return results, table


def _answers(result) -> dict[str, dict]:
    """A batch's recommendation messages by event id."""
    return {json.loads(v)["event_id"]: json.loads(v) for _, _, v in result.recommendations}


@pytest.mark.parametrize("answer_duplicates", [False, True])
@torch.no_grad()
def test_a_redelivered_batch_is_never_applied_twice_and_at_least_once_answers_it_again(
        recommender: Recommender, answer_duplicates: bool) -> None:
    """After a crash between a batch's state write and its send, the batch comes again. Its events
    are in the users' states already: they must not be applied twice. At-least-once
    (answer_duplicates) answers each of them again from the user's current state, which for a
    user's last event is exactly its first answer; exactly-once never sees such a redelivery and
    answers a duplicate id not at all."""
    items = recommender.item_tokens[1:10]
    first = [_source(0, "a", items[0], "e0"), _source(1, "a", items[1], "e1"), _source(2, "b", items[2], "e2")]
    again = [*first, _source(3, "a", items[3], "e3")]

    processor = BatchProcessor(recommender, top_k=10, answer_duplicates=answer_duplicates)
    [first_result, result], table = _process([first, again], processor)
    original, answers = _answers(first_result), _answers(result)
    assert result.duplicates == 3 and not result.dead_letters
    if answer_duplicates:
        assert sorted(answers) == ["e0", "e1", "e2", "e3"] and result.answered_duplicates == 3
        for event_id in ("e1", "e2"):  # each user's last event of the first batch
            assert answers[event_id]["items"] == original[event_id]["items"]
            np.testing.assert_allclose(answers[event_id]["scores"], original[event_id]["scores"], atol=1e-6)
        # e0's answer comes from a's state after e1 (its current state), with e0 and e1 seen.
        assert not {items[0], items[1]} & set(answers["e0"]["items"])
        assert answers["e0"]["items"] == original["e1"]["items"]
    else:
        assert sorted(answers) == ["e3"] and result.answered_duplicates == 0

    # The states equal a run that saw each event once.
    _, once = _process([first, [again[-1]]], BatchProcessor(recommender, top_k=10))
    for user in ("a", "b"):
        got, expected = decode(table[user]), decode(once[user])
        np.testing.assert_allclose(got.hidden, expected.hidden, atol=1e-6)
        np.testing.assert_allclose(got.memory_values, expected.memory_values, atol=1e-6)
        assert got.history.tolist() == expected.history.tolist() and got.events == expected.events


@torch.no_grad()
def test_redelivered_events_beyond_the_recent_ids_and_without_ids_are_applied_once(
        recommender: Recommender) -> None:
    """At-least-once redelivers everything after the last commit: for one user in a session that
    can be more events than the recent ids kept (KSR_RECENT_EVENT_IDS), and events need not carry
    an id. The last applied event's partition and offset catch every one of them; an event of
    another partition is compared by id only (a user moves only when the partitions change)."""
    items = recommender.item_tokens[1:12]
    events = [_source(i, "a", items[i], f"e{i}" if i % 2 else None) for i in range(8)]

    def run(batches, processor):
        results, table = _process(batches, processor)
        return results, decode(table["a"])

    processor = BatchProcessor(recommender, top_k=10, recent_event_ids=2, answer_duplicates=True)
    # The whole session comes again after the crash, then one new event.
    results, state = run([events, [*events, _source(8, "a", items[8], "e8")]], processor)
    assert results[1].duplicates == 8 and results[1].answered_duplicates == 8
    assert (state.last_partition, state.last_offset) == (0, 8)
    _, once = run([[*events, _source(8, "a", items[8], "e8")]], BatchProcessor(recommender, top_k=10))
    assert state.events == once.events == 9 and state.history.tolist() == once.history.tolist()
    np.testing.assert_allclose(state.hidden, once.hidden, atol=1e-6)
    np.testing.assert_allclose(state.memory_values, once.memory_values, atol=1e-6)

    # From another partition, a lower offset is a new event (unless its id is a recent one).
    moved = [_source(0, "a", items[9], "m0", partition=1), _source(1, "a", items[10], "e7", partition=1)]
    results, state = run([events, moved], BatchProcessor(recommender, top_k=10, recent_event_ids=2))
    assert results[1].duplicates == 1 and state.events == 9 and (state.last_partition, state.last_offset) == (1, 0)
