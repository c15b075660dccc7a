"""The prequential protocol (`ksr evaluate --protocol stream`) on a tiny synthetic data set.

Pinned: the vectorised stream gives the same ranks as the event-by-event definition (test, then
update, ranked as the worker ranks); training and fine-tuning never see an event they should not;
the result carries the three settings with their metrics; the plot is a PNG.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import checkpoint as checkpoints
from model import data, prequential
from model import train as training
from model.ksr import KSRConfig
from model.serving import Recommender
from model.transe import TransEConfig

N_USERS, N_ITEMS, TRAIN_FRACTION, FINETUNE_EVERY = 12, 40, 0.7, 20
METRIC_KEYS = {"hit@10", "hit@20", "ndcg@10", "ndcg@20", "mrr@10", "mrr@20"}


def write_toy(folder: Path) -> Path:
    """12 users interleaved in time, 40 items with a small KG (genre, director), two repeat events."""
    rng = random.Random(7)
    rows, ts = [], 1_000_000
    remaining = {u: rng.sample(range(1, N_ITEMS + 1), rng.randint(8, 25)) for u in range(N_USERS)}
    remaining[0].append(remaining[0][0])  # a repeat: the worker never serves it back, a miss
    remaining[5].append(remaining[5][1])
    late = {10, 11}  # users whose first event comes after the split
    while any(remaining.values()):
        active = [u for u, items in remaining.items() if items and (u not in late or ts > 1_000_250)]
        if not active:
            ts += 1
            continue
        user = rng.choice(active)
        for _ in range(rng.randint(1, 3)):  # short bursts, as in real logs
            if remaining[user]:
                rows.append(f"u{user}\ti{remaining[user].pop(0)}\t{ts}")
        ts += rng.choice([0, 1, 1, 2])  # some ties in time
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    kg = ["head_id:token\trelation_id:token\ttail_id:token"]
    for i in range(1, N_ITEMS + 1):
        kg.append(f"e{i}\tgenre\tg{i % 4}")
        if i % 3:
            kg.append(f"e{i}\tdirector\td{i % 5}")
    (folder / "toy.kg").write_text("\n".join(kg) + "\n")
    link = ["item_id:token\tentity_id:token"] + [f"i{i}\te{i}" for i in range(1, N_ITEMS + 1) if i != 13]
    (folder / "toy.link").write_text("\n".join(link) + "\n")
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[data.Dataset, checkpoints.Checkpoint, checkpoints.Checkpoint]:
    """The data set, a small KSR checkpoint (best epoch 1) and a pop checkpoint."""
    root = tmp_path_factory.mktemp("prequential")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KSR_CACHE_DIR", str(root / "cache"))
        torch.set_num_threads(1)
        dataset = data.load(write_toy(root / "toy"))
        small = KSRConfig(n_items=dataset.n_items, n_relations=0, kb_dim=8, item_dim=8, hidden_dim=12, out_dim=8)
        transe = TransEConfig(dim=8, epochs=2)
        training.train(dataset, root / "ksr", training.TrainConfig(epochs=1, threads=1, batch_users=4), small, transe)
        training.train(dataset, root / "pop", training.TrainConfig(model="pop", threads=1))
        yield dataset, checkpoints.load(root / "ksr"), checkpoints.load(root / "pop")


def naive_ranks(recommender: Recommender, dataset: data.Dataset, n_train: int, update: bool) -> list[int]:
    """The definition, one event at a time: replay the prefix per user, then rank, then update."""
    model = recommender.model
    states, seen = {}, {}
    with torch.no_grad():
        for position in range(dataset.n_events):
            user, item = int(dataset.users[position]), int(dataset.items[position])
            state = states.get(user, model.initial_state(1))
            history = seen.setdefault(user, [])
            if position >= n_train:
                # What the worker would serve this user right now, and where the true item ranks in it.
                served = recommender.rank(state, [history], k=10)[0].items
                scores, _ = model.score(state, recommender.item_vectors)
                scores = scores[0]
                scores[0] = float("-inf")
                scores[history] = float("-inf")
                rank = dataset.n_items if item in history else int((scores > scores[item]).sum())
                assert (rank < 10) == (dataset.item_tokens[item] in served), (position, rank, served)
                yield rank
            if update or position < n_train:
                states[user] = model.step(state, torch.tensor([item]))
            history.append(item)


@pytest.mark.parametrize("chunk_events", [3, 4096])
@pytest.mark.parametrize("update", [True, False], ids=["online", "frozen"])
def test_vectorised_stream_equals_event_by_event(toy, update: bool, chunk_events: int) -> None:
    dataset, loaded, _ = toy
    n_train = prequential.split_index(dataset.n_events, TRAIN_FRACTION)
    model = prequential.train_prefix_model(loaded, dataset, n_train, epochs=1, progress=False)
    recommender = Recommender(checkpoints.Checkpoint(loaded.meta, model, None))
    vectorised = prequential.stream_ranks(
        recommender, dataset, n_train, update=update, chunk_events=chunk_events, progress=False
    )
    expected = list(naive_ranks(recommender, dataset, n_train, update))
    assert len(expected) == dataset.n_events - n_train
    assert vectorised.tolist() == expected
    assert (vectorised == dataset.n_items).sum() == 2  # the two repeats are misses
    assert (vectorised < 10).any() and (vectorised >= 10).any()


def test_stream_rounds_keep_each_users_order() -> None:
    users = np.array([3, 3, 1, 3, 2, 1, 1])
    rounds = prequential.stream_rounds(users)
    assert [r.tolist() for r in rounds] == [[0, 2, 4], [1, 5], [3, 6]]
    assert prequential.stream_rounds(np.array([], dtype=np.int64)) == []


@pytest.fixture(scope="module")
def stream_run(toy, tmp_path_factory):
    """One full `evaluate_stream` with a spy on every training epoch and a plot."""
    dataset, loaded, _ = toy
    calls: list[list[np.ndarray]] = []
    original = training.train_epoch

    def spy(model, optimizer, sequences, *args, **kwargs):
        calls.append([np.array(s) for s in sequences])
        return original(model, optimizer, sequences, *args, **kwargs)

    plot = tmp_path_factory.mktemp("plot") / "stream.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train_epoch", spy)
        result = prequential.evaluate_stream(
            loaded, dataset, plot=str(plot), train_fraction=TRAIN_FRACTION, finetune_every=FINETUNE_EVERY,
            finetune_epochs=2, progress=False,
        )
    return result, calls, plot


def test_training_and_finetuning_see_only_the_past(toy, stream_run) -> None:
    dataset, loaded, _ = toy
    result, calls, _ = stream_run
    n_train = result["train_events"]
    epochs = max(1, loaded.meta["metrics"]["best_epoch"])
    finetunes = (result["stream_events"] - 1) // FINETUNE_EVERY
    assert finetunes >= 2 and result["finetunes"] == finetunes
    assert len(calls) == epochs + 2 * finetunes
    ends = [n_train] * epochs + [n_train + FINETUNE_EVERY * (k // 2 + 1) for k in range(2 * finetunes)]
    for sequences, end in zip(calls, ends, strict=True):
        # Per user, exactly that user's events before `end`, in time order: nothing later leaks in.
        expected = [[] for _ in range(dataset.n_users)]
        for position in range(end):
            expected[int(dataset.users[position])].append(int(dataset.items[position]))
        assert [s.tolist() for s in sequences] == expected
    # Users first seen after the split are in the stream but never in the initial training.
    assert result["new_users"] == 2
    assert all(len(calls[0][u]) == 0 for u in (dataset.user_index["u10"], dataset.user_index["u11"]))


def test_result_has_three_settings_with_metrics(stream_run, toy) -> None:
    dataset, _, _ = toy
    result, _, _ = stream_run
    assert result["protocol"] == "stream" and result["data"] == "toy"
    assert result["train_events"] + result["stream_events"] == dataset.n_events
    assert result["train_events"] == int(dataset.n_events * TRAIN_FRACTION)
    assert result["items"] == N_ITEMS and result["users"] == N_USERS
    assert result["finetune_every"] == FINETUNE_EVERY and result["finetune_epochs"] == 2
    assert result["repeat_events"] == 2 and result["seconds"] >= 0
    for setting in prequential.SETTINGS:
        assert set(result[setting]) == METRIC_KEYS
        assert all(0.0 <= v <= 1.0 for v in result[setting].values())
        assert result[setting]["hit@10"] <= result[setting]["hit@20"]


def test_plot_is_a_png(stream_run) -> None:
    result, _, plot = stream_run
    assert result["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_without_epochs_is_online(toy) -> None:
    """Zero fine-tune epochs: the swap and the recomputation from history change nothing."""
    dataset, loaded, _ = toy
    result = prequential.evaluate_stream(
        loaded, dataset, train_fraction=TRAIN_FRACTION, finetune_every=FINETUNE_EVERY, finetune_epochs=0,
        progress=False,
    )
    assert result["online_finetune"] == result["online"]


def test_pop_checkpoint(toy) -> None:
    dataset, _, pop = toy
    result = prequential.evaluate_stream(
        pop, dataset, train_fraction=TRAIN_FRACTION, finetune_every=FINETUNE_EVERY, progress=False
    )
    n_train = result["train_events"]
    counts = np.bincount(dataset.items[:n_train], minlength=dataset.n_items)
    # Frozen pop, first stream event: rank among the user's unseen items by prefix counts.
    user, item = int(dataset.users[n_train]), int(dataset.items[n_train])
    seen = set(dataset.items[:n_train][dataset.users[:n_train] == user].tolist()) | {0}
    expected = sum(1 for j in range(dataset.n_items) if j not in seen and counts[j] > counts[item])
    ranks = prequential.pop_stream_ranks(dataset, n_train, "frozen", FINETUNE_EVERY)
    assert ranks[0] == expected
    for setting in prequential.SETTINGS:
        assert set(result[setting]) == METRIC_KEYS


def test_split_index_refuses_an_empty_side() -> None:
    assert prequential.split_index(10, 0.8) == 8
    with pytest.raises(ValueError):
        prequential.split_index(1, 0.8)
    with pytest.raises(ValueError):
        prequential.split_index(10, 1.0)


def test_the_command_line_sets_the_prefix_epochs(toy) -> None:
    """`ksr evaluate --protocol stream --epochs N` trains the prefix model for N epochs, where the
    default takes the checkpoint's best leave-one-out epoch (chosen on items after the split)."""
    import json
    import os
    import subprocess

    from conftest import KSR, REPO

    dataset, _, _ = toy
    root = dataset.path.parent
    env = {**os.environ, "KSR_CACHE_DIR": str(root / "cache")}
    result = subprocess.run(
        [*KSR, "evaluate", "--protocol", "stream", "--data", str(dataset.path), "--checkpoint", str(root / "ksr"),
         "--epochs", "2", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    assert json.loads(result.stdout)["train_epochs"] == 2


def test_fine_tuning_a_checkpoint_trained_with_ema_returns_the_weights_average(toy) -> None:
    """`ksr train --ema` keeps and saves the weights' moving average; the stream protocol's
    training and fine-tunes return it too. The raw weights train as without it."""
    import copy
    import dataclasses

    dataset, loaded, _ = toy
    config, _, _ = prequential.checkpoint_settings(loaded)
    sequences = prequential.sequences_until(dataset, 60)
    plain = prequential._fit(copy.deepcopy(loaded.model), sequences, config, 2, 3, "plain", False)
    raw = copy.deepcopy(loaded.model)
    averaged = prequential._fit(raw, sequences, dataclasses.replace(config, ema=0.5), 2, 3, "ema", False)
    assert averaged is not raw
    for name, weight in plain.state_dict().items():
        assert torch.equal(raw.state_dict()[name], weight), name  # the same training
    changed = [name for name, _ in plain.named_parameters()
               if not torch.allclose(averaged.state_dict()[name], plain.state_dict()[name])]
    assert changed, "the average must differ from the last weights"
    assert not averaged.training
