"""Serving a checkpoint: step a batch of users and answer each with top-k and an explanation.

This is the model's public surface for the streaming worker and for `ksr recommend`: `ksr recommend`
replays a history step by step (`Recommender.replay`), the worker runs a batch's events per user in
one forward (`Recommender.run`), and both rank through `rank_vectors`, so a user's recommendation
is the same whichever of the two produced it (tests/test_processing.py, tests/test_worker.py).
Items a user has already consumed are never recommended back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from model import checkpoint as checkpoints
from model.ksr import KSR, UserState

# Ranking a large catalog (Recommender._top_k): items scored per block (a 256-event batch's block
# of scores stays at 4 MiB); without the compiled kernel, items per group whose best score is kept.
RANK_BLOCK_ITEMS = 4096
RANK_GROUP_ITEMS = 32
# Batches of at most this many users are scored against the whole catalog at once: their score
# matrix is small, and a block loop's extra steps cost more than they save (`ksr bench step`).
RANK_DIRECT_MAX_BATCH = 16
# What the ranking's score products run in (`KSR_RANKING_PRECISION`); the answers are the same.
# "auto": int8 for catalogs of at least INT8_AUTO_MIN_ITEMS items, where it is the faster (at 16,384
# items float32 still was, at 32,768 int8 was at batches of 16 and 512: `ksr bench step --items N`).
RANKING_PRECISIONS = ("auto", "float32", "int8")
INT8_AUTO_MIN_ITEMS = 32768
# One user is ranked in float32 even then: int8 products of one row run far below their rate, and
# one float32 product over the catalog was as fast or faster (`ksr bench step --items 100000`).
INT8_MIN_BATCH = 2


@dataclass
class Recommendation:
    """Top-k for one user: item tokens, their scores, and relation weights (the explanation)."""

    items: list[str]
    scores: list[float]
    explanation: list[dict]


def _row_starts(lengths) -> np.ndarray:
    """Where each row begins in its entries laid end to end: row b's are flat[starts[b]:starts[b + 1]]."""
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def resolve_ranking_precision(setting: str, n_items: int, compiled: bool = True) -> str:
    """What a ranking precision setting means for a catalog of `n_items` (padding included): "auto"
    is int8 from INT8_AUTO_MIN_ITEMS items on when the compiled kernels serve, float32 otherwise.
    Raises ValueError for an unknown setting, or int8 without the compiled kernels."""
    if setting not in RANKING_PRECISIONS:
        raise ValueError(f"ranking_precision must be one of {', '.join(RANKING_PRECISIONS)}, got {setting!r}")
    if setting == "int8" and not compiled:
        raise ValueError("the int8 ranking runs through the compiled kernels: serve it with compiled=True")
    if setting != "auto":
        return setting
    return "int8" if compiled and n_items - 1 >= INT8_AUTO_MIN_ITEMS else "float32"


class Recommender:
    """A loaded KSR/GRU4Rec checkpoint, ready to step users and rank the catalog."""

    def __init__(
        self, checkpoint: checkpoints.Checkpoint, compiled: bool = True, ranking_precision: str = "auto"
    ) -> None:
        """`compiled`: `run` through the compiled recurrence (model/kernels.py); False runs PyTorch's
        own batch forward (the training path, without autograd): the same results, slower.
        `ranking_precision`: "int8" chooses candidates by int8 products and answers exactly as
        "float32" does (`model/ranking_int8.py`; needs `compiled`); "auto", the one that is faster
        for the catalog's size (`resolve_ranking_precision`). `ranking_setting` keeps what was asked,
        `ranking_precision` what it became."""
        if checkpoint.model is None:
            raise checkpoints.CheckpointError(
                f"a {checkpoint.kind} checkpoint has no per-user state to stream: serve a ksr or "
                "gru4rec checkpoint (`ksr train --model ksr`)"
            )
        self.ranking_setting = ranking_precision
        self.ranking_precision = resolve_ranking_precision(ranking_precision, len(checkpoint.item_tokens), compiled)
        self.checkpoint = checkpoint
        self.model: KSR = checkpoint.model.eval()
        self.version = checkpoint.version
        self.item_tokens = checkpoint.item_tokens
        self.item_index = {token: i for i, token in enumerate(self.item_tokens)}
        self.relation_tokens = checkpoint.relation_tokens
        # The same, as arrays of Python strings: a batch's answers take their ids in one gather.
        self._item_token_array = np.array(self.item_tokens, dtype=object)
        self._relation_token_array = np.array(self.relation_tokens, dtype=object)
        with torch.no_grad():
            self.item_vectors = self.model.item_vectors()  # (N, O), built once per model
        self.compiled = compiled
        if compiled:
            from model import kernels  # numba, only when serving through it

            kernels.warm()  # the worker's batch path (`run`) compiled before the first batch
        self.rank_block_items = RANK_BLOCK_ITEMS
        self.rank_direct_max_batch = RANK_DIRECT_MAX_BATCH
        self.int8_catalog = None
        if self.ranking_precision == "int8":
            from model.ranking_int8 import Int8Catalog

            self.int8_catalog = Int8Catalog(self.item_vectors)
        # Rows the int8 ranking did not certify at first, ranked again (since load: with wider int8
        # candidates, and if need be in float32), and of them those ranked again in float32.
        self.ranked_again = 0
        self.ranked_again_float = 0
        self.int8_candidates: int | None = None  # candidates per row; None: the int8 ranking's rule

    @classmethod
    def load(cls, directory: str | Path, compiled: bool = True, ranking_precision: str = "auto") -> Recommender:
        """Load a checkpoint folder (raises CheckpointError with what to fix)."""
        return cls(checkpoints.load(directory), compiled, ranking_precision)

    @property
    def n_items(self) -> int:
        """Catalog size, padding row included."""
        return len(self.item_tokens)

    def initial_state(self, batch_size: int) -> UserState:
        """States of users with no events."""
        return self.model.initial_state(batch_size)

    @torch.no_grad()
    def replay(self, histories: Sequence[Sequence[int]]) -> UserState:
        """Recompute states from item-index histories (any lengths), one batched step per position."""
        state = self.initial_state(len(histories))
        longest = max((len(h) for h in histories), default=0)
        for t in range(longest):
            active = [row for row, h in enumerate(histories) if len(h) > t]
            rows = torch.tensor(active)
            items = torch.tensor([histories[row][t] for row in active])
            stepped = self.model.step(state.index(rows), items)
            state.hidden[rows] = stepped.hidden
            state.memory_values[rows] = stepped.memory_values
            state.evidence[rows] = stepped.evidence
        return state

    @torch.no_grad()
    def step(self, state: UserState, items: torch.Tensor) -> UserState:
        """One event for each of B users: their new states (rank them later, all at once)."""
        return self.model.step(state, items)

    @torch.no_grad()
    def advance(
        self, state: UserState, items: torch.Tensor, seen: Sequence[Sequence[int]], k: int = 10
    ) -> tuple[UserState, list[Recommendation]]:
        """One event for each of B users: new states and, for each, the top-k unseen items.

        state: B users' states; items: (B,) item indices just consumed; seen[b]: item indices user b
        has consumed (the new one included), excluded from the ranking.
        """
        new_state = self.model.step(state, items)
        return new_state, self.rank(new_state, seen, k)

    @torch.no_grad()
    def run(
        self, state: UserState, items: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, UserState]:
        """Several events for each of B users at once: items (B, T) right-padded, lengths (B,).

        Returns the user vectors (B, T, O) and read weights (B, T, A) after every event (rank them
        with `rank_vectors`) and the users' final states; the same as `step` event by event.
        """
        return self.model(items, lengths, state, serving=self.compiled)

    @torch.no_grad()
    def user_vectors(self, state: UserState) -> tuple[torch.Tensor, torch.Tensor]:
        """The user vectors (B, O) and read weights (B, A) of B states, for `rank_vectors`."""
        return self.model.user_vector(state)

    @torch.no_grad()
    def rank(self, state: UserState, seen: Sequence[Sequence[int]], k: int = 10) -> list[Recommendation]:
        """Top-k unseen items and the explanation for each user of a batch of states."""
        return self.rank_vectors(*self.user_vectors(state), seen, k)

    @torch.no_grad()
    def rank_vectors(
        self, user_vectors: torch.Tensor, weights: torch.Tensor, seen: Sequence[Sequence[int]], k: int = 10
    ) -> list[Recommendation]:
        """Top-k unseen items and the explanation for each of B user vectors (B, O) with their read
        weights (B, A); seen[b]: item indices excluded for row b."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.n_items - 1)
        top_scores, top_items = self._top_k(user_vectors, seen, k)
        # Rounded, ordered and named for the whole batch at once; per row only the explanation's
        # dicts are built. -inf marks a catalog exhausted by the seen filter: fewer than k items left.
        scores = top_scores.numpy().astype(np.float64)
        finite = np.isfinite(scores).all(axis=1)
        scores = np.round(scores, 6).tolist()
        items = self._item_token_array[top_items.numpy()].tolist()
        weights = weights.numpy().astype(np.float64)
        order = np.argsort(-weights, axis=1, kind="stable")  # largest first; ties in relation order
        weights = np.round(np.take_along_axis(weights, order, axis=1), 6).tolist()
        relations = self._relation_token_array[order].tolist()
        results = []
        for row_scores, row_items, row_finite, row_relations, row_weights in zip(
            scores, items, finite.tolist(), relations, weights
        ):
            if not row_finite:
                kept = [(v, i) for v, i in zip(row_scores, row_items) if v != float("-inf")]
                row_scores, row_items = [v for v, _ in kept], [i for _, i in kept]
            results.append(
                Recommendation(
                    items=row_items,
                    scores=row_scores,
                    explanation=[{"relation": r, "weight": w} for r, w in zip(row_relations, row_weights)],
                )
            )
        return results

    def _top_k(
        self, user_vectors: torch.Tensor, seen: Sequence[Sequence[int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best scores and their item indices per row (B, k), seen items and padding excluded.

        `compiled`: block by block through the ranking kernel (`_top_k_compiled`). Otherwise
        (`KSR_SERVING_KERNEL=torch`): a catalog of one block (`rank_block_items`; ml-100k's is), or
        a batch of at most `rank_direct_max_batch` users, is scored at once and ranked by
        `torch.topk` after masking the seen items; a larger one is scored block by block, keeping
        only each group of RANK_GROUP_ITEMS consecutive items' best score; the k best items can
        only lie in the k groups with the best maxima (those k groups hold k items at least as good
        as the k-th best group maximum), so only those k x RANK_GROUP_ITEMS candidates are scored
        again and ranked. The answer is the whole
        catalog's top-k, without a (B, N) score matrix (100 MB for a 256-event batch over 100,000
        items) or a top-k pass over it (`ksr bench step --items 100000` times both).
        """
        lengths = [len(s) for s in seen]
        cols = np.concatenate(seen).astype(np.int64) if seen else np.zeros(0, dtype=np.int64)
        n, batch = self.n_items, user_vectors.shape[0]
        if self.compiled:
            starts = _row_starts(lengths)  # row b's seen items: cols[starts[b]:starts[b + 1]]
            if self.int8_catalog is not None and batch >= INT8_MIN_BATCH:
                return self._top_k_int8(user_vectors, starts, cols, k)
            return self._top_k_compiled(user_vectors, starts, cols, k)
        if n <= self.rank_block_items or batch <= self.rank_direct_max_batch:
            scores = user_vectors @ self.item_vectors.T  # (B, N)
            rows = torch.from_numpy(np.repeat(np.arange(batch), lengths))
            scores[:, 0] = float("-inf")  # padding
            scores[rows, torch.from_numpy(cols)] = float("-inf")
            return torch.topk(scores, k, dim=1)

        rows = np.repeat(np.arange(len(seen)), lengths)
        # Seen items sorted by item, so that each block takes one slice of them.
        order = np.argsort(cols, kind="stable")
        rows, cols = torch.from_numpy(rows[order]), torch.from_numpy(cols[order])
        group = RANK_GROUP_ITEMS
        size = max(group, self.rank_block_items // group * group)
        starts = range(0, n, size)
        bounds = np.searchsorted(cols.numpy(), [*starts, n])  # each block's slice of the seen items
        maxima = []
        for block, start in enumerate(starts):
            scores = user_vectors @ self.item_vectors[start : start + size].T  # (B, block)
            if start == 0:
                scores[:, 0] = float("-inf")
            low, high = bounds[block], bounds[block + 1]
            scores[rows[low:high], cols[low:high] - start] = float("-inf")
            tail = -scores.shape[1] % group
            if tail:
                scores = F.pad(scores, (0, tail), value=float("-inf"))
            maxima.append(scores.view(batch, -1, group).amax(dim=2))  # (B, block / group)
        maxima = torch.cat(maxima, dim=1)
        # The k best groups, or all of them when there are fewer: either way at least k items.
        _, groups = torch.topk(maxima, min(k, maxima.shape[1]), dim=1)  # (B, <= k)
        candidates = (groups.unsqueeze(-1) * group + torch.arange(group)).view(batch, -1)  # (B, <= k * group)
        outside = candidates >= n
        candidates = candidates.clamp(max=n - 1)
        scores = torch.bmm(self.item_vectors[candidates], user_vectors.unsqueeze(-1)).squeeze(-1)
        keys = torch.arange(batch).unsqueeze(1) * n + candidates
        excluded = outside | (candidates == 0) | torch.isin(keys, rows * n + cols)
        top_scores, picked = torch.topk(scores.masked_fill(excluded, float("-inf")), k, dim=1)
        return top_scores, torch.gather(candidates, 1, picked)

    def _top_k_compiled(
        self, user_vectors: torch.Tensor, starts: np.ndarray, cols: np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_top_k` through the ranking kernel: the catalog scored `rank_block_items` at a time
        (ml-100k's in one block; for at most `rank_direct_max_batch` users, the whole catalog in
        one), each block folded into every row's running top-k by one compiled pass that skips the
        seen items (`kernels.merge_top_k_unseen`). Every item is scored once and nothing else is
        written: at 100,000 items the ranking costs about 1.4 times the products alone (`ksr bench
        step --items 100000`: `rank_ms_per_event_blocks` beside `score_ms_per_event`)."""
        from model import kernels

        batch = user_vectors.shape[0]
        top_scores = np.full((batch, k), -np.inf, dtype=np.float32)
        top_items = np.zeros((batch, k), dtype=np.int64)
        # A few users' scores against the whole catalog are small: one product, one pass.
        size = self.n_items if batch <= self.rank_direct_max_batch else self.rank_block_items
        for start in range(0, self.n_items, size):
            scores = user_vectors @ self.item_vectors[start : start + size].T  # fresh: the kernel overwrites it
            kernels.merge_top_k_unseen(scores.numpy(), start, starts, cols, top_scores, top_items)
        return torch.from_numpy(top_scores), torch.from_numpy(top_items)

    def _top_k_int8(
        self, user_vectors: torch.Tensor, starts: np.ndarray, cols: np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_top_k` on int8 products (`model/ranking_int8.py`). Rows whose answer the bound does not
        certify are ranked again: on int8 products with `INT8_WIDER` times the candidates (a few rows'
        products cost little more than one row's), and the rows still not certified by
        `_top_k_compiled`, so every row gets the float ranking's answer."""
        from model.ranking_int8 import INT8_WIDER

        catalog = self.int8_catalog
        candidates = self.int8_candidates or catalog.candidates(k)
        top_scores, top_items, certified = catalog.top_k(user_vectors, starts, cols, k, candidates)
        for wider in (True, False):
            if certified.all():
                break
            rows = np.flatnonzero(~certified)  # at least one
            again_starts = _row_starts(starts[rows + 1] - starts[rows])
            again_cols = np.concatenate([cols[starts[row] : starts[row + 1]] for row in rows])
            vectors = user_vectors[torch.from_numpy(rows)]
            if wider:
                self.ranked_again += len(rows)
                scores, items, now = catalog.top_k(vectors, again_starts, again_cols, k, candidates * INT8_WIDER)
                certified[rows] = now
            else:
                self.ranked_again_float += len(rows)
                scores, items = self._top_k_compiled(vectors, again_starts, again_cols, k)
            top_scores[torch.from_numpy(rows)], top_items[torch.from_numpy(rows)] = scores, items
        return top_scores, top_items

    def lookup(self, tokens: Sequence[str]) -> list[int]:
        """Item indices of raw item ids; raises KeyError naming the first unknown id."""
        missing = [t for t in tokens if t not in self.item_index]
        if missing:
            raise KeyError(f"unknown item id {missing[0]!r} (not in the checkpoint's catalog)")
        return [self.item_index[t] for t in tokens]
