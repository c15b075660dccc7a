"""The int8 ranking (KSR_RANKING_PRECISION=int8, model/ranking_int8.py) answers as the float32 one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from model import ranking_int8
from model.bench import _synthetic_recommender
from model.ranking_int8 import Int8Catalog
from model.serving import Recommender


def _users(recommender: Recommender, batch: int, seed: int, history: int = 12):
    """The model's user vectors after `history` random events, and those events as seen items."""
    generator = torch.Generator().manual_seed(seed)
    histories = torch.randint(1, recommender.n_items, (batch, history), generator=generator)
    vectors, _ = recommender.user_vectors(recommender.model.replay(histories))
    return vectors, histories.tolist()


@pytest.fixture(scope="module")
def pair() -> tuple[Recommender, Recommender]:
    """A random KSR of 5,000 items (three int8 blocks, two float32 ones) served both ways."""
    plain = _synthetic_recommender(5001, 6)
    return plain, Recommender(plain.checkpoint, compiled=True, ranking_precision="int8")


@pytest.mark.parametrize("batch", [2, 7, 40])
def test_the_int8_ranking_gives_the_float_rankings_answers(pair, batch) -> None:
    plain, quantized = pair
    users, seen = _users(plain, batch, seed=batch)
    float_scores, float_items = plain._top_k(users, seen, 10)
    quantized.ranked_again = 0
    int8_scores, int8_items = quantized._top_k(users, seen, 10)
    assert torch.equal(int8_items, float_items)
    assert torch.allclose(int8_scores, float_scores, atol=1e-5)
    assert quantized.ranked_again == 0  # 64 candidates certify every row here
    for row, items in enumerate(int8_items.tolist()):
        assert not set(items) & set(seen[row]) and 0 not in items


@pytest.mark.parametrize("wider", [4, 1])
def test_rows_the_bound_does_not_certify_are_ranked_again(pair, monkeypatch, wider) -> None:
    """With as many candidates as answers, the bound can rarely tell that nothing outside them is
    better: those rows are ranked again with `wider` times the candidates, and those still not
    certified (all of them when the second pass is no wider) in float32. Every answer is the
    float ranking's."""
    plain, quantized = pair
    monkeypatch.setattr(ranking_int8, "CANDIDATES_PER_K", 1)
    monkeypatch.setattr(ranking_int8, "CANDIDATES_MIN", 1)
    monkeypatch.setattr(ranking_int8, "INT8_WIDER", wider)
    users, seen = _users(plain, 40, seed=3)
    quantized.ranked_again = quantized.ranked_again_float = 0
    int8_scores, int8_items = quantized._top_k(users, seen, 10)
    float_scores, float_items = plain._top_k(users, seen, 10)
    assert quantized.ranked_again > 0
    if wider == 1:
        assert quantized.ranked_again_float == quantized.ranked_again
    else:
        assert quantized.ranked_again_float < quantized.ranked_again
    assert torch.equal(int8_items, float_items)
    assert torch.allclose(int8_scores, float_scores, atol=1e-5)


def test_items_that_int8_cannot_tell_apart_are_never_certified_wrong() -> None:
    """300 items that are one vector plus noise far below int8's step: their int8 scores tie, so
    the candidates are chosen blind. No row may be certified with another answer than the exact one."""
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(16, generator=generator), dim=0)
    items = torch.cat([torch.zeros(1, 16), base + 1e-4 * torch.randn(300, 16, generator=generator)])
    catalog = Int8Catalog(items)
    users = torch.randn(6, 16, generator=generator)
    starts, cols = np.zeros(7, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, top, certified = catalog.top_k(users, starts, cols, 10, catalog.candidates(10))
    exact = users @ items.T
    exact[:, 0] = float("-inf")
    expected = torch.topk(exact, 10, dim=1).indices
    assert not certified.all()
    for row in np.flatnonzero(certified):
        assert torch.equal(top[row], expected[row])


@pytest.mark.parametrize("spread", [0.01, 1.0, 30.0])
def test_the_error_bound_holds_for_every_user_and_item(spread) -> None:
    """|u.v - int8 score| <= the bound, over random users and items of unequal sizes (a plain dot
    product model's item vectors are not normalised)."""
    generator = torch.Generator().manual_seed(int(spread * 100))
    items = torch.randn(500, 32, generator=generator) * torch.rand(500, 1, generator=generator) * spread
    users = torch.randn(20, 32, generator=generator) * spread
    catalog = Int8Catalog(items, block_items=128)
    quantized, user_scale = catalog.quantize_users(users)
    int8_scores = torch.cat([quantized.int() @ block.int() for block in catalog.blocks], dim=1)
    approx = int8_scores.double() * user_scale.double() * catalog.scale
    error = (users.double() @ items.double().T - approx).abs().amax(dim=1)
    bound = catalog.error_bound(quantized, user_scale)
    assert (error <= bound).all()
    assert (error > 0).any()  # the rounding is there to be bounded


def test_a_catalog_with_fewer_unseen_items_than_k_answers_as_the_float_ranking() -> None:
    plain = _synthetic_recommender(13, 3)  # 12 items
    quantized = Recommender(plain.checkpoint, compiled=True, ranking_precision="int8")
    users, seen = _users(plain, 3, seed=1, history=8)
    float_scores, float_items = plain._top_k(users, seen, 10)
    int8_scores, int8_items = quantized._top_k(users, seen, 10)
    assert torch.equal(int8_items, float_items)
    assert torch.equal(torch.isinf(int8_scores), torch.isinf(float_scores))
    assert torch.isinf(int8_scores).any()  # fewer than 10 unseen items in some row
    finite = torch.isfinite(float_scores)
    assert torch.allclose(int8_scores[finite], float_scores[finite], atol=1e-5)


def test_a_user_vector_with_nan_is_ranked_by_the_float_path(pair) -> None:
    plain, quantized = pair
    users, seen = _users(plain, 4, seed=2)
    users[1, 3] = float("nan")
    _, float_items = plain._top_k(users, seen, 10)
    quantized.ranked_again = quantized.ranked_again_float = 0
    _, int8_items = quantized._top_k(users, seen, 10)
    assert quantized.ranked_again == quantized.ranked_again_float == 1  # no bound holds for that row
    assert torch.equal(int8_items, float_items)


def test_the_int8_ranking_needs_the_compiled_kernels_and_a_known_precision(pair) -> None:
    plain, _ = pair
    with pytest.raises(ValueError, match="compiled"):
        Recommender(plain.checkpoint, compiled=False, ranking_precision="int8")
    with pytest.raises(ValueError, match="auto, float32, int8"):
        Recommender(plain.checkpoint, ranking_precision="int4")


def test_auto_ranks_in_int8_from_32768_items_and_only_through_the_compiled_kernels(pair) -> None:
    from model.serving import INT8_AUTO_MIN_ITEMS, resolve_ranking_precision

    assert INT8_AUTO_MIN_ITEMS == 32768
    assert resolve_ranking_precision("auto", 32768 + 1) == "int8"  # padding included
    assert resolve_ranking_precision("auto", 32767 + 1) == "float32"
    assert resolve_ranking_precision("auto", 100001, compiled=False) == "float32"
    assert resolve_ranking_precision("float32", 100001) == "float32"
    assert resolve_ranking_precision("int8", 1683) == "int8"
    plain, _ = pair  # 5,000 items
    served = Recommender(plain.checkpoint)
    assert (served.ranking_setting, served.ranking_precision, served.int8_catalog) == ("auto", "float32", None)
    large = Recommender(_synthetic_recommender(INT8_AUTO_MIN_ITEMS + 1, 3).checkpoint)
    assert large.ranking_precision == "int8" and large.int8_catalog is not None


def test_the_error_bound_holds_where_every_component_rounds_down_by_almost_half_a_step() -> None:
    """The worst case the bound is built for: one scale of 1 on both sides (a component of 127),
    every other component 0.49 above an integer, all errors of one sign. The error comes within
    a quarter of the bound, so a bound much tighter than the derivation's would fail here."""
    vector = torch.tensor([127.0, 100.49, 90.49, 80.49, 70.49, 60.49, 50.49, 40.49])
    catalog = Int8Catalog(torch.stack([torch.zeros(8), vector]))
    quantized, user_scale = catalog.quantize_users(vector.unsqueeze(0))
    assert catalog.scale == 1.0 and float(user_scale) == 1.0
    approx = float(quantized.int() @ catalog.blocks[0].int()[:, 1])
    error = abs(float(vector.double() @ vector.double()) - approx)
    bound = float(catalog.error_bound(quantized, user_scale)[0])
    assert 0.75 * bound < error <= bound


def test_the_heap_kernel_keeps_each_rows_best_unseen_items_block_by_block() -> None:
    from model import kernels

    rng = np.random.default_rng(0)
    scores = np.stack([rng.permutation(1000) for _ in range(5)]).astype(np.int32) - 500  # distinct per row
    seen = [rng.choice(np.arange(1, 1000), 30, replace=False) for _ in range(5)]
    starts = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
    cols = np.concatenate(seen).astype(np.int64)
    heap = np.full((5, 64), kernels.INT32_MIN, dtype=np.int32)
    heap_items = np.zeros((5, 64), dtype=np.int64)
    for start in (0, 300, 700):  # three blocks of unequal sizes
        end = {0: 300, 300: 700, 700: 1000}[start]
        kernels.heap_top_k_unseen_int(scores[:, start:end].copy(), start, starts, cols, heap, heap_items)
    for row in range(5):
        allowed = np.setdiff1d(np.arange(1, 1000), seen[row])
        expected = allowed[np.argsort(-scores[row, allowed])[:64]]
        assert set(heap_items[row].tolist()) == set(expected.tolist())
        assert heap[row, 0] == heap[row].min() == scores[row, expected].min()  # the smallest at the root
        assert sorted(heap[row].tolist()) == sorted(scores[row, heap_items[row]].tolist())


def test_the_candidates_are_ranked_by_float_score_then_lower_item_and_empty_entries_are_skipped() -> None:
    """`kernels.rank_candidates`, which ranks the heap's candidates again: integer vectors, so the
    float32 scores are exact whatever the order of summation; items 3 and 7 have the same vector, so
    they tie, and the lower ranks first whichever comes first in the heap; entries still at INT32_MIN
    hold no item, and a row with fewer candidates than k ends in -inf and item 0."""
    from model import kernels

    rng = np.random.default_rng(3)
    vectors = rng.integers(-4, 5, (10, 6)).astype(np.float32)
    vectors[7] = vectors[3]
    users = rng.integers(-4, 5, (2, 6)).astype(np.float32)
    users[0] = vectors[3]  # items 3 and 7 are row 0's best: the tie is at the top
    empty = kernels.INT32_MIN
    heap = np.array([[5, empty, 9, 1, 4, 2, 8, empty], [3, empty, 1, empty, empty, empty, empty, empty]], np.int32)
    heap_items = np.array([[7, 0, 3, 1, 9, 2, 5, 0], [4, 0, 6, 0, 0, 0, 0, 0]], np.int64)
    k = 3
    top_scores = np.full((2, k), -np.inf, np.float32)
    top_items = np.zeros((2, k), np.int64)
    kernels.rank_candidates(vectors, users, heap, heap_items, top_scores, top_items)
    for row in range(2):
        kept = [int(i) for v, i in zip(heap[row], heap_items[row]) if v != empty]
        exact = {i: float(vectors[i].astype(np.float64) @ users[row].astype(np.float64)) for i in kept}
        expected = sorted(kept, key=lambda i: (-exact[i], i))[:k]
        assert top_items[row, : len(expected)].tolist() == expected
        assert top_scores[row, : len(expected)].tolist() == [exact[i] for i in expected]
    assert top_items[0, :2].tolist() == [3, 7]
    assert top_scores[1, 2] == -np.inf and top_items[1, 2] == 0
