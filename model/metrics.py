"""Ranking metrics over the full catalog: HR@k, NDCG@k, MRR@k from the rank of the true item."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CUTOFFS = (10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items: how many other items score higher or the same.

    scores (B, N) with the padding item already at -inf; targets (B,). Every doubt counts against
    the target, so that no model gains from it: an item that ties with the target ranks above it (a
    model that scores every item alike hits nothing), an item scored NaN ranks above every number,
    and a target scored NaN ranks last (a model whose scores went NaN scores 0, not 1).
    """
    target_scores = scores.gather(1, targets.view(-1, 1))
    ahead = (scores >= target_scores).sum(1) - 1 + scores.isnan().sum(1)  # the target ties with itself
    return torch.where(target_scores.view(-1).isnan(), scores.shape[1], ahead)


@dataclass
class RankingMetrics:
    """Running sums of hit, NDCG and MRR at each cutoff; `result()` gives the means."""

    cutoffs: tuple[int, ...] = CUTOFFS
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, ranks: torch.Tensor) -> None:
        """Add a batch of 0-based ranks."""
        ranks = ranks.double()
        self.count += len(ranks)
        for k in self.cutoffs:
            inside = ranks < k
            for name, values in (
                (f"hit@{k}", inside.double()),
                (f"ndcg@{k}", torch.where(inside, 1.0 / torch.log2(ranks + 2), 0.0)),
                (f"mrr@{k}", torch.where(inside, 1.0 / (ranks + 1), 0.0)),
            ):
                self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())

    def result(self) -> dict[str, float]:
        """Mean of each metric (rounded to 6 places) over everything added."""
        if self.count == 0:  # every metric, at zero: nothing ranked, nothing hit
            return {f"{name}@{k}": 0.0 for k in self.cutoffs for name in ("hit", "mrr", "ndcg")}
        return {name: round(total / self.count, 6) for name, total in sorted(self.sums.items())}
