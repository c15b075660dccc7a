"""Leave-one-out evaluation, as RecBole runs it for sequential models.

Each user's events in time order (stable: ties keep file order); the last item is the test target,
the second last the validation target, the rest is training. Every item of the catalog is ranked;
nothing is masked (items the user has seen stay in the ranking, as in RecBole).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import Checkpoint
from model.data import Dataset
from model.ksr import KSR
from model.metrics import RankingMetrics, target_ranks


@dataclass
class LeaveOneOut:
    """Per user (index = user index): full sequence; users with >= 3 events are evaluated."""

    sequences: list[np.ndarray]

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> LeaveOneOut:
        return cls(dataset.user_sequences())

    def train_sequences(self) -> list[np.ndarray]:
        """Everything but each user's last two events."""
        return self.training_part(self.sequences)

    @staticmethod
    def training_part(per_user: list[np.ndarray]) -> list[np.ndarray]:
        """Of any per-user, event-aligned arrays (items, timestamps), the training events' part."""
        return [values[:-2] for values in per_user]

    def evaluated_users(self) -> list[int]:
        """Users with a training event, a validation and a test target."""
        return [u for u, s in enumerate(self.sequences) if len(s) >= 3]


def pad(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad item sequences with 0: (B, T) ids and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    items = torch.zeros(len(sequences), int(lengths.max()) if len(sequences) else 0, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        items[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)  # copies read-only arrays
    return items, lengths


@torch.no_grad()
def evaluate_loo_ksr(
    model: KSR, split: LeaveOneOut, batch_users: int = 128, seen_share: bool = False
) -> dict[str, dict[str, float]]:
    """Validation and test metrics of a KSR/GRU4Rec model: {"valid": {...}, "test": {...}}.

    One forward over each user's events minus the last gives both: the user vector after the
    third-last event predicts the validation item, the one after the second-last the test item.

    `seen_share` adds test["seen_share@10"]: the share of each user's top 10 at the test position
    (ranked as the protocol ranks: nothing masked) that the user has already consumed. The worker
    never serves those; the protocol counts them as misses, since no ml-100k user rates an item twice.
    It also adds "test_seen_masked": the test metrics with those items removed from the ranking, as
    the worker serves (a diagnostic beside the protocol, never a replacement for it; a test item
    the user had already consumed counts as a miss there).
    """
    was_training = model.training
    model.eval()
    valid, test = RankingMetrics(), RankingMetrics()
    users = sorted(split.evaluated_users(), key=lambda u: len(split.sequences[u]))
    item_vectors = model.item_vectors()
    seen, slots = 0, 0
    masked = RankingMetrics()
    for start in range(0, len(users), batch_users):
        chunk = [split.sequences[u] for u in users[start : start + batch_users]]
        items, lengths = pad([s[:-1] for s in chunk])
        user_vectors, _, _ = model(items, lengths)
        rows = torch.arange(len(chunk))
        for metrics, position, target in (
            (valid, lengths - 2, torch.tensor([s[-2] for s in chunk])),
            (test, lengths - 1, torch.tensor([s[-1] for s in chunk])),
        ):  # the loop leaves `scores` and `target` at the test position
            scores = user_vectors[rows, position] @ item_vectors.T
            scores[:, 0] = float("-inf")
            metrics.add(target_ranks(scores, target))
        if seen_share:  # `scores` is the test position's; `items` holds each user's history before it
            top = scores.topk(min(10, scores.shape[1] - 1), dim=1).indices
            consumed = torch.zeros_like(scores, dtype=torch.bool)
            consumed[rows.repeat_interleave(lengths), items[items > 0]] = True
            seen += int(consumed.gather(1, top).sum())
            slots += top.numel()
            masked.add(target_ranks(scores.masked_fill(consumed, float("-inf")), target))
    model.train(was_training)
    result = {"valid": valid.result(), "test": test.result()}
    if seen_share:
        result["test"]["seen_share@10"] = seen / max(slots, 1)
        result["test_seen_masked"] = masked.result()
    return result


def evaluate_loo_pop(popularity: torch.Tensor, split: LeaveOneOut) -> dict[str, dict[str, float]]:
    """Validation and test metrics of a popularity ranking (the same list for every user)."""
    valid, test = RankingMetrics(), RankingMetrics()
    users = split.evaluated_users()
    scores = popularity.double().clone()
    scores[0] = float("-inf")
    scores = scores.unsqueeze(0).expand(len(users), -1)
    for metrics, offset in ((valid, -2), (test, -1)):
        targets = torch.tensor([split.sequences[u][offset] for u in users])
        metrics.add(target_ranks(scores, targets))
    return {"valid": valid.result(), "test": test.result()}


def check_compatible(checkpoint: Checkpoint, dataset: Dataset) -> None:
    """Refuse to evaluate a checkpoint on data whose item ids it does not know."""
    if checkpoint.item_tokens != dataset.item_tokens:
        raise ValueError(
            f"the checkpoint's {len(checkpoint.item_tokens) - 1} items differ from the data's "
            f"{dataset.n_items - 1} ({dataset.name}): evaluate on the data it was trained on, or retrain"
        )


def evaluate_loo(checkpoint: Checkpoint, dataset: Dataset) -> dict:
    """`ksr evaluate --protocol loo`: test metrics at the top level, validation under "valid"."""
    check_compatible(checkpoint, dataset)
    split = LeaveOneOut.from_dataset(dataset)
    if checkpoint.model is None:
        result = evaluate_loo_pop(checkpoint.popularity, split)
    else:
        result = evaluate_loo_ksr(checkpoint.model, split, seen_share=True)
        result["test"]["seen_share@10"] = round(result["test"]["seen_share@10"], 4)
    return {
        **result["test"],
        "valid": result["valid"],
        # Not the protocol: the test ranking without the items each user had consumed, as served.
        **({"seen_masked": result["test_seen_masked"]} if "test_seen_masked" in result else {}),
        "users": len(split.evaluated_users()),
        "items": dataset.n_items - 1,
        "protocol": "loo",
        "model": checkpoint.kind,
        "data": dataset.name,
    }
