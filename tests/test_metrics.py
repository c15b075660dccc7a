"""Ranking metrics: every doubt about a target's rank counts against it, so no model gains from one."""

from __future__ import annotations

import math

import torch

from model.finetune import FinetuneConfig, decide
from model.metrics import CUTOFFS, RankingMetrics, target_ranks

INF = float("inf")
NAN = float("nan")


def test_rank_is_the_number_of_items_above_the_target() -> None:
    scores = torch.tensor([[-INF, 0.1, 0.9, 0.5, 0.3], [-INF, 0.1, 0.9, 0.5, 0.3]])
    assert target_ranks(scores, torch.tensor([2, 1])).tolist() == [0, 3]


def test_ties_rank_above_the_target() -> None:
    # A model that scores every item alike ranks its target last among them, not first.
    same = torch.tensor([[-INF, 1.0, 1.0, 1.0, 1.0]])
    assert target_ranks(same, torch.tensor([3])).tolist() == [3]
    assert target_ranks(torch.tensor([[-INF, 0.5, 0.7, 0.5]]), torch.tensor([1])).tolist() == [2]


def test_nan_scores_never_help_the_target() -> None:
    # NaN elsewhere ranks above the target; a NaN target ranks past every item (a miss at any cutoff).
    assert target_ranks(torch.tensor([[-INF, NAN, 0.2, 0.9]]), torch.tensor([3])).tolist() == [1]
    everything_nan = torch.full((2, 30), NAN)
    ranks = target_ranks(everything_nan, torch.tensor([1, 2]))
    assert ranks.tolist() == [30, 30]
    metrics = RankingMetrics()
    metrics.add(ranks)
    assert all(value == 0.0 for value in metrics.result().values())


def test_masked_items_stay_below_an_unmasked_target() -> None:
    scores = torch.tensor([[-INF, -INF, 0.1, -INF]])  # items 1 and 3 consumed, so masked
    assert target_ranks(scores, torch.tensor([2])).tolist() == [0]


def test_metrics_of_known_ranks() -> None:
    metrics = RankingMetrics()
    metrics.add(torch.tensor([0, 1, 9, 10, 25]))
    result = metrics.result()
    assert result["hit@10"] == 0.6 and result["hit@20"] == 0.8
    assert math.isclose(result["ndcg@10"], (1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5, abs_tol=1e-6)
    assert math.isclose(result["mrr@20"], (1 + 1 / 2 + 1 / 10 + 1 / 11) / 5, abs_tol=1e-6)


def test_nothing_ranked_gives_every_metric_at_zero_and_no_promotion() -> None:
    empty = RankingMetrics().result()
    assert empty == {f"{name}@{k}": 0.0 for k in CUTOFFS for name in ("hit", "mrr", "ndcg")}
    config = FinetuneConfig()
    champion = {**empty, "events": 0}
    assert not decide(champion, {**empty, "ndcg@10": 1.0, "events": 0}, config)
    assert decide({**empty, "events": 5}, {**empty, "ndcg@10": 1.0, "events": 5}, config)
