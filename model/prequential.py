"""Prequential evaluation: what a streaming recommender lives by (`ksr evaluate --protocol stream`).

All events in time order (the data set's stable sort); a fresh model is trained on the first 80% with
the checkpoint's settings (the checkpoint's own weights saw the leave-one-out training data, which
reaches past the split, so they are not used); then each later event is first used to test, then to
update: the true item is ranked against the user's current recommendations, exactly as the worker
ranks them (the whole catalog minus padding minus the items the user has already consumed), and only
then does the event enter the user's state. Three settings share the one trained model:

- ``frozen``: weights and user states stop at the split. The seen-item set still grows with every
  stream event, so the list served is the one a deployed frozen model would serve (it never offers
  an item back); only the model's picture of the user stands still. Users first seen after the split
  keep the initial (empty-history) state.
- ``online``: weights frozen, every event goes through the model's streaming step (GRU + memory
  write) before the user's next event is ranked: what `ksr worker` does between fine-tunes.
- ``online_finetune``: ``online``, plus every ``finetune_every`` stream events a copy of the current
  weights is fine-tuned for ``finetune_epochs`` epochs on every event seen so far (prefix + stream so
  far, per-user sequences, a fresh Adam with the checkpoint's learning rate), swapped in, and every
  user's state is recomputed from their full history under the new weights: what the worker does
  after a hot swap (`Recommender.replay`).

Vectorised but exact. Between two weight swaps users do not interact (weights are fixed and each
user's ranking depends only on their own state and seen set), so a segment of events is split into
rounds, round n holding each user's n-th event of the segment in time order; one batched rank + step
per round gives the same ranks as the event-by-event definition (pinned by tests/test_prequential.py).

A repeat event (the user consumed the item before) can never be served by the worker, so it counts as
a miss (rank = catalog size); ml-100k has none. Ties count in the item's favour, as in
`model.metrics.target_ranks`. For a ``pop`` checkpoint, popularity is counted on the prefix:
``frozen`` keeps it, ``online`` counts every stream event after it is ranked, ``online_finetune``
recounts at each fine-tune point.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from collections.abc import Callable
from dataclasses import fields

import numpy as np
import torch

from model import train as training
from model.checkpoint import Checkpoint
from model.data import Dataset
from model.evaluate import check_compatible
from model.ksr import KSR, KSRConfig, UserState
from model.metrics import RankingMetrics, target_ranks
from model.serving import Recommender
from model.transe import TransEConfig

SETTINGS = ("frozen", "online", "online_finetune")
PLOT_WINDOW = 1000


def _log(message: str, progress: bool = True) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- the split
def split_index(n_events: int, train_fraction: float) -> int:
    """Number of events in the training prefix: floor(n_events * train_fraction), at least 1."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    n_train = int(n_events * train_fraction)
    if n_train < 1 or n_train >= n_events:
        raise ValueError(
            f"{n_events} events leave no training prefix or no stream at train_fraction {train_fraction}"
        )
    return n_train


def sequences_until(dataset: Dataset, end: int) -> list[np.ndarray]:
    """Per user index, the item indices of that user's events among the first `end` (time order).

    Users without such events get an empty array. Nothing at or after position `end` is read.
    """
    users = np.asarray(dataset.users[:end])
    items = np.asarray(dataset.items[:end])
    order = np.argsort(users, kind="stable")  # stable: each user's events keep the time order
    counts = np.bincount(users, minlength=dataset.n_users)
    return np.split(items[order], np.cumsum(counts)[:-1])


def stream_rounds(users: np.ndarray) -> list[np.ndarray]:
    """Positions 0..len-1 grouped into rounds: round n holds each user's n-th event, in time order.

    Within a round every user appears at most once; a user's events are in successive rounds, in
    their original order. Processing the rounds in turn therefore equals processing event by event
    whenever users do not interact (fixed weights).
    """
    occurrence = np.empty(len(users), dtype=np.int64)
    counter: dict[int, int] = {}
    for position, user in enumerate(users.tolist()):
        n = counter.get(user, 0)
        occurrence[position] = n
        counter[user] = n + 1
    if not len(users):
        return []
    order = np.argsort(occurrence, kind="stable")
    sizes = np.bincount(occurrence)
    return np.split(order, np.cumsum(sizes)[:-1])


# --------------------------------------------------------------------------------- training
def checkpoint_settings(checkpoint: Checkpoint) -> tuple[training.TrainConfig, KSRConfig, TransEConfig]:
    """The checkpoint's training, model and TransE settings (unknown training keys are ignored)."""
    meta = checkpoint.meta
    known = {f.name for f in fields(training.TrainConfig)}
    recorded = meta.get("train", {})
    train_config = training.TrainConfig(
        **{k: v for k, v in recorded.items() if k in known and k != "model"},
        model=checkpoint.kind,
        # Checkpoints from before the setting existed were trained from PyTorch's N(0, 1).
        **({} if "item_init_std" in recorded else {"item_init_std": None}),
    )
    model_config = KSRConfig.from_dict(meta["config"])
    transe = TransEConfig(**meta["transe"]) if meta.get("transe") else TransEConfig()
    return train_config, model_config, transe


def _fit(
    model: KSR,
    sequences: list[np.ndarray],
    config: training.TrainConfig,
    epochs: int,
    seed: int,
    label: str,
    progress: bool,
) -> KSR:
    """`epochs` passes of `model.train.train_epoch` with a fresh Adam; returns the model in eval mode.

    With `config.ema` > 0 (a checkpoint trained with `--ema`) it returns the weights' moving
    average, as `ksr train` keeps and saves it, started from `model`'s weights.
    """
    training.seed_everything(seed)
    averaged = copy.deepcopy(model) if config.ema > 0 else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = random.Random(seed)
    negative_weights = training.item_popularity(sequences, model.config.n_items)
    negative_weights[0] = 0
    events = sum(len(s) for s in sequences)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        with torch.enable_grad():  # fine-tunes are called from inside the no-grad stream loop
            loss = training.train_epoch(model, optimizer, sequences, config, generator, negative_weights, averaged)
        _log(
            f"stream: {label} epoch {epoch}/{epochs} on {events} events: loss {loss:.4f} "
            f"{time.perf_counter() - started:.1f}s",
            progress,
        )
    return (averaged if averaged is not None else model).eval()


def train_prefix_model(
    checkpoint: Checkpoint,
    dataset: Dataset,
    n_train: int,
    epochs: int | None = None,
    seed: int = 2020,
    progress: bool = True,
) -> KSR:
    """A fresh KSR/GRU4Rec with the checkpoint's settings, trained on the first `n_train` events only.

    `epochs` defaults to the checkpoint's best epoch (at least 1); there is no early stopping.
    """
    train_config, model_config, transe = checkpoint_settings(checkpoint)
    if epochs is None:
        epochs = max(1, int(checkpoint.meta.get("metrics", {}).get("best_epoch", 1)))
    training.seed_everything(seed)
    model, _ = training.build_model(dataset, train_config, model_config, transe)
    return _fit(model, sequences_until(dataset, n_train), train_config, epochs, seed, "train", progress)


def finetuned(
    model: KSR,
    dataset: Dataset,
    end: int,
    config: training.TrainConfig,
    epochs: int,
    seed: int,
    progress: bool = True,
) -> KSR:
    """A copy of `model` fine-tuned on the first `end` events (the original is left untouched)."""
    tuned = copy.deepcopy(model)
    return _fit(tuned, sequences_until(dataset, end), config, epochs, seed, f"fine-tune@{end}", progress)


# --------------------------------------------------------------------------------- streaming
def _recommender(model: KSR, meta: dict) -> Recommender:
    return Recommender(Checkpoint(meta, model, None))


@torch.no_grad()
def rank_targets(
    recommender: Recommender, state: UserState, seen: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """0-based rank of each target among what `Recommender.rank` would serve the users now.

    state: B users; seen (B, N) bool, the items each user consumed before this event; targets (B,).
    Scored like `Recommender.rank`: padding and seen items at -inf. A seen target is a miss
    (rank N), since the worker never serves it.
    """
    scores, _ = recommender.model.score(state, recommender.item_vectors)
    scores[:, 0] = float("-inf")
    scores = scores.masked_fill(seen, float("-inf"))
    ranks = target_ranks(scores, targets)
    repeat = seen.gather(1, targets.view(-1, 1)).squeeze(1)
    return torch.where(repeat, torch.full_like(ranks, recommender.n_items), ranks)


@torch.no_grad()
def stream_ranks(
    recommender: Recommender,
    dataset: Dataset,
    n_train: int,
    update: bool = True,
    refresh: Callable[[int], Recommender] | None = None,
    refresh_every: int | None = None,
    chunk_events: int = 4096,
    label: str = "",
    progress: bool = True,
) -> np.ndarray:
    """Ranks of the stream events n_train.. under one setting, test-then-update, in time order.

    update: step user states with each event (False: states stay as they were at the split).
    refresh(end): called after every `refresh_every` stream events (while events remain) with the
    number of events seen so far; returns the recommender to serve from then on, and every user's
    state is recomputed from their full history under it (`Recommender.replay`).
    """
    n_events = dataset.n_events
    users_all = np.asarray(dataset.users)
    items_all = np.asarray(dataset.items)
    histories = [s.tolist() for s in sequences_until(dataset, n_train)]
    state = recommender.replay(histories)
    seen = torch.zeros(dataset.n_users, dataset.n_items, dtype=torch.bool)
    for user, history in enumerate(histories):
        seen[user, history] = True
    ranks = np.empty(n_events - n_train, dtype=np.int64)
    started = time.perf_counter()
    position, next_log = n_train, n_train
    while position < n_events:
        streamed = position - n_train
        if refresh is not None and refresh_every and streamed and streamed % refresh_every == 0:
            recommender = refresh(position)
            state = recommender.replay([s.tolist() for s in sequences_until(dataset, position)])
        end = min(position + chunk_events, n_events)
        if refresh is not None and refresh_every:
            end = min(end, n_train + (streamed // refresh_every + 1) * refresh_every)
        users, items = users_all[position:end], items_all[position:end]
        for rows in stream_rounds(users):
            index = torch.as_tensor(users[rows])
            targets = torch.as_tensor(items[rows])
            current = state.index(index)
            ranks[position - n_train + rows] = rank_targets(recommender, current, seen[index], targets).numpy()
            seen[index, targets] = True
            if update:
                stepped = recommender.model.step(current, targets)
                state.hidden[index] = stepped.hidden
                state.memory_values[index] = stepped.memory_values
                state.evidence[index] = stepped.evidence
        position = end
        if position >= next_log or position == n_events:
            done = position - n_train
            hit = float((ranks[:done] < 10).mean())
            _log(
                f"stream: {label} {done}/{n_events - n_train} events, HR@10 {hit:.4f} "
                f"{time.perf_counter() - started:.1f}s",
                progress,
            )
            next_log = position + 5000
    return ranks


def pop_stream_ranks(dataset: Dataset, n_train: int, mode: str, refresh_every: int) -> np.ndarray:
    """Popularity baseline, event by event: counts from the prefix; see the module docstring."""
    users, items = np.asarray(dataset.users), np.asarray(dataset.items)
    counts = np.bincount(items[:n_train], minlength=dataset.n_items).astype(np.float64)
    live = counts.copy()
    seen = np.zeros((dataset.n_users, dataset.n_items), dtype=bool)
    seen[users[:n_train], items[:n_train]] = True
    seen[:, 0] = True  # padding is never served
    ranks = np.empty(dataset.n_events - n_train, dtype=np.int64)
    for position in range(n_train, dataset.n_events):
        streamed = position - n_train
        if mode == "online_finetune" and streamed and streamed % refresh_every == 0:
            counts = live.copy()
        user, item = users[position], items[position]
        scores = live if mode == "online" else counts
        if seen[user, item]:
            ranks[streamed] = dataset.n_items
        else:
            ranks[streamed] = int(np.count_nonzero((scores > scores[item]) & ~seen[user]))
        seen[user, item] = True
        live[item] += 1
    return ranks


# --------------------------------------------------------------------------------- the protocol
def metrics_of(ranks: np.ndarray) -> dict[str, float]:
    """HR, NDCG and MRR at 10 and 20 of 0-based ranks."""
    metrics = RankingMetrics()
    metrics.add(torch.as_tensor(ranks))
    return metrics.result()


def evaluate_stream(
    checkpoint: Checkpoint,
    dataset: Dataset,
    plot: str | None = None,
    train_fraction: float = 0.8,
    finetune_every: int = 5000,
    finetune_epochs: int = 2,
    seed: int = 2020,
    progress: bool = True,
    train_epochs: int | None = None,
    chunk_events: int = 4096,
    threads: int | None = None,
) -> dict:
    """`ksr evaluate --protocol stream`: frozen vs. online vs. online + periodic fine-tuning.

    Returns the figures of each setting (HR/NDCG/MRR at 10 and 20 over every stream event) and the
    protocol's parameters; writes a PNG of HR@10 over stream time to `plot` when given.
    `train_epochs` overrides the checkpoint's best epoch; `threads` sets torch's CPU threads.
    """
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    if finetune_every < 1 or finetune_epochs < 0:
        raise ValueError("finetune_every must be >= 1 and finetune_epochs >= 0")
    check_compatible(checkpoint, dataset)
    n_train = split_index(dataset.n_events, train_fraction)
    n_stream = dataset.n_events - n_train
    prefix_users = set(np.asarray(dataset.users[:n_train]).tolist())
    stream_users = np.asarray(dataset.users[n_train:])
    new_users = set(stream_users.tolist()) - prefix_users
    _log(
        f"stream: {dataset.name}: {n_train} training events, {n_stream} stream events "
        f"({len(new_users)} users first seen in the stream); model {checkpoint.kind}",
        progress,
    )
    ranks: dict[str, np.ndarray] = {}
    epochs = 0
    if checkpoint.kind == "pop":
        for setting in SETTINGS:
            ranks[setting] = pop_stream_ranks(dataset, n_train, setting, finetune_every)
    else:
        train_config, _, _ = checkpoint_settings(checkpoint)
        epochs = train_epochs or max(1, int(checkpoint.meta.get("metrics", {}).get("best_epoch", 1)))
        model = train_prefix_model(checkpoint, dataset, n_train, epochs, seed, progress)
        meta = checkpoint.meta
        base = _recommender(model, meta)
        ranks["frozen"] = stream_ranks(
            base, dataset, n_train, update=False, chunk_events=chunk_events, label="frozen", progress=progress
        )
        ranks["online"] = stream_ranks(
            base, dataset, n_train, update=True, chunk_events=chunk_events, label="online", progress=progress
        )
        serving = [model]  # the weights in service; each fine-tune starts from the latest

        def refresh(end: int) -> Recommender:
            tuned = finetuned(
                serving[-1], dataset, end, train_config, finetune_epochs, seed + len(serving), progress
            )
            serving.append(tuned)
            return _recommender(tuned, meta)

        ranks["online_finetune"] = stream_ranks(
            _recommender(copy.deepcopy(model), meta), dataset, n_train, update=True, refresh=refresh,
            refresh_every=finetune_every, chunk_events=chunk_events, label="online_finetune",
            progress=progress,
        )
    finetunes = (n_stream - 1) // finetune_every
    # A repeat (an item the user consumed before) ranks at the catalog size in every setting.
    repeats = int(np.count_nonzero(ranks["online"] >= dataset.n_items))
    result = {
        "protocol": "stream",
        "data": dataset.name,
        "model": checkpoint.kind,
        "train_fraction": train_fraction,
        "train_events": n_train,
        "stream_events": n_stream,
        "users": dataset.n_users,
        "stream_users": len(set(stream_users.tolist())),
        "new_users": len(new_users),
        "items": dataset.n_items - 1,
        "repeat_events": repeats,
        "train_epochs": epochs,
        "finetune_every": finetune_every,
        "finetune_epochs": finetune_epochs,
        "finetunes": finetunes,
        "seed": seed,
        **{setting: metrics_of(ranks[setting]) for setting in SETTINGS},
    }
    frozen_hit = result["frozen"]["hit@10"]
    result["lift_hit@10"] = {
        setting: (round(result[setting]["hit@10"] / frozen_hit, 4) if frozen_hit else None)
        for setting in ("online", "online_finetune")
    }
    if plot:
        plot_stream(plot, ranks, result, finetune_every)
        result["plot"] = str(plot)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _log(
        "stream: HR@10 " + ", ".join(f"{s} {result[s]['hit@10']:.4f}" for s in SETTINGS)
        + f" ({result['seconds']}s)",
        progress,
    )
    return result


def sliding_hit_rate(ranks: np.ndarray, window: int, k: int = 10) -> np.ndarray:
    """HR@k over the last `window` events at each stream position (fewer at the start)."""
    hits = np.concatenate([[0.0], np.cumsum(ranks < k, dtype=np.float64)])
    ends = np.arange(1, len(ranks) + 1)
    starts = np.maximum(ends - window, 0)
    return (hits[ends] - hits[starts]) / (ends - starts)


def plot_stream(path: str, ranks: dict[str, np.ndarray], result: dict, finetune_every: int) -> None:
    """PNG of HR@10 over a sliding window of stream events for each setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n_stream = len(ranks["frozen"])
    window = max(1, min(PLOT_WINDOW, n_stream // 5))
    figure, axes = plt.subplots(figsize=(9, 5))
    x = np.arange(1, n_stream + 1)
    for setting in SETTINGS:
        axes.plot(
            x, sliding_hit_rate(ranks[setting], window), linewidth=1.3,
            label=f"{setting.replace('_', ' + ')} (HR@10 {result[setting]['hit@10']:.4f})",
        )
    for n, boundary in enumerate(range(finetune_every, n_stream, finetune_every)):
        axes.axvline(boundary, color="grey", linestyle=":", linewidth=0.8,
                     label="fine-tune + swap" if n == 0 else None)
    axes.set_xlabel(f"stream event (time order; {result['train_events']} events before the split)")
    axes.set_ylabel(f"HR@10 over the last {window} events")
    axes.set_title(
        f"Prequential HR@10, {result['data']} ({result['model']}): frozen "
        f"{result['frozen']['hit@10']:.4f}, online {result['online']['hit@10']:.4f}, "
        f"online + fine-tune {result['online_finetune']['hit@10']:.4f}",
        fontsize=10,
    )
    axes.set_xlim(1, max(n_stream, 2))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
