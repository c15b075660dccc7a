"""Fine-tuning on a window of recent events, and the champion/challenger comparison that gates it.

No Kafka here: the fine-tuner in worker/ reads the window from Kafka and hands over plain events.
The newest slice of the window (by time) is held out of the fine-tune and used to compare the
challenger with the champion, ranking each held-out event the way the worker serves it (full
catalog, items the user already consumed in the window excluded).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.evaluate import pad
from model.ksr import KSR
from model.metrics import RankingMetrics, target_ranks
from model.train import TrainConfig, item_popularity, train_epoch


@dataclass(frozen=True)
class FinetuneConfig:
    """How a round fine-tunes and decides."""

    epochs: int = 2
    max_seconds: float = 300.0  # time bound on the fine-tune itself
    holdout_fraction: float = 0.1  # newest share of the window, held out for the comparison
    metric: str = "ndcg@10"
    margin: float = 0.0  # promote only if challenger > champion + margin
    lr: float | None = None  # None: the checkpoint's training learning rate
    seed: int = 2020

    def to_dict(self) -> dict:
        """Plain dict for metadata and announcements."""
        return asdict(self)


@dataclass
class WindowSplit:
    """Per-user sequences of the window and where each user's held-out part starts."""

    sequences: list[np.ndarray]  # item indices in time order
    holdout_start: list[int]  # index into the sequence of the first held-out event
    train_events: int
    holdout_events: int

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's events before the held-out slice."""
        return [s[:start] for s, start in zip(self.sequences, self.holdout_start)]


def split_window(events: list[tuple[str, int, float]], holdout_fraction: float) -> WindowSplit:
    """Group (user, item index, ts) events, already in arrival order, into per-user sequences;
    the newest `holdout_fraction` of them (stable by time) is held out."""
    order = sorted(range(len(events)), key=lambda i: (events[i][2], i))
    cut = len(order) - round(len(order) * holdout_fraction)
    held_out = set(order[cut:])
    by_user: dict[str, list[tuple[int, bool]]] = {}
    for i in order:
        by_user.setdefault(events[i][0], []).append((events[i][1], i in held_out))
    sequences, starts = [], []
    for items in by_user.values():
        sequences.append(np.array([item for item, _ in items], dtype=np.int64))
        flags = [held for _, held in items]
        starts.append(flags.index(True) if True in flags else len(flags))
    return WindowSplit(sequences, starts, cut, len(order) - cut)


@torch.no_grad()
def holdout_metrics(model: KSR, split: WindowSplit, batch_users: int = 128) -> dict[str, float]:
    """Rank every held-out event (from the 2nd event of a user on) given the user's window history."""
    was_training = model.training
    model.eval()
    metrics = RankingMetrics()
    users = [u for u, s in enumerate(split.sequences) if len(s) > max(1, split.holdout_start[u])]
    item_vectors = model.item_vectors()
    for start in range(0, len(users), batch_users):
        chunk = users[start : start + batch_users]
        items, lengths = pad([split.sequences[u] for u in chunk])
        user_vectors, _, _ = model(items, lengths)
        rows, positions, targets, seen = [], [], [], []
        for row, u in enumerate(chunk):
            sequence = split.sequences[u]
            for p in range(max(1, split.holdout_start[u]), len(sequence)):
                rows.append(row)
                positions.append(p - 1)
                targets.append(int(sequence[p]))
                seen.append(sequence[:p])
        scores = user_vectors[torch.tensor(rows), torch.tensor(positions)] @ item_vectors.T
        scores[:, 0] = float("-inf")
        for r, items_seen in enumerate(seen):
            # The worker never serves items the user consumed; the true item is new by
            # construction unless the user repeats it, in which case it stays rankable.
            mask = torch.as_tensor(items_seen[items_seen != targets[r]])
            scores[r, mask] = float("-inf")
        metrics.add(target_ranks(scores, torch.tensor(targets)))
    model.train(was_training)
    return {**metrics.result(), "events": metrics.count}


def fine_tune(
    champion: KSR, split: WindowSplit, train_config: TrainConfig, config: FinetuneConfig
) -> tuple[KSR, dict]:
    """A copy of the champion trained on the window's non-held-out events, within the time bound."""
    torch.manual_seed(config.seed)
    challenger = copy.deepcopy(champion)
    optimizer = torch.optim.Adam(
        challenger.parameters(), lr=config.lr or train_config.lr, weight_decay=train_config.weight_decay
    )
    generator = random.Random(config.seed)
    sequences = split.train_sequences()
    # BPR's popularity-sampled negatives (smoothed), never the padding row.
    negative_weights = item_popularity(sequences, champion.config.n_items) + 1
    negative_weights[0] = 0
    started = time.perf_counter()
    epochs, losses = 0, []
    for _ in range(config.epochs):
        if time.perf_counter() - started > config.max_seconds:
            break
        losses.append(train_epoch(challenger, optimizer, sequences, train_config, generator, negative_weights))
        epochs += 1
    challenger.eval()
    return challenger, {"epochs": epochs, "loss": losses, "seconds": round(time.perf_counter() - started, 2)}


def decide(champion: dict[str, float], challenger: dict[str, float], config: FinetuneConfig) -> bool:
    """Promote only when the challenger beats the champion by more than the margin, on at least one
    held-out event (with none there is nothing to judge by, and the champion stays)."""
    if not challenger.get("events", 1):
        return False
    return challenger[config.metric] > champion[config.metric] + config.margin
