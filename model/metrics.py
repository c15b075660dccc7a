"""Ranking metrics over the full catalog: HR@k, NDCG@k, MRR@k from the rank of the true item."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CUTOFFS = (10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items: how many items score strictly higher.

    scores (B, N) with the padding item already at -inf; targets (B,).
    """
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores > target_scores).sum(1)


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
        if self.count == 0:
            return {name: 0.0 for name in self.sums}
        return {name: round(total / self.count, 6) for name, total in sorted(self.sums.items())}
