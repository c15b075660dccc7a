"""Ranking a large catalog on int8 products, with the exact answer certified (`KSR_RANKING_PRECISION=int8`).

At 100,000 items the ranking is the serving step's cost, and most of it is the score products
(README, "At scale"). Here the products run on int8 copies of the vectors (`torch._int_mm`, about
four times the float32 rate on one core in a script not in the repo, docs/speed.md; and a quarter
of the bytes to read for a small batch),
and they only choose candidates: each row's best `candidates` items by the int8 scores (a compiled
pass like the float ranking's, keeping a heap: `kernels.heap_top_k_unseen_int`), which are scored
again in float32 and ranked. A bound on the rounding error says when that answer is the float
ranking's; when it cannot say so, the row is ranked again until it can:

With a per-row scale a for the user vector u and one scale c for the whole item matrix, u = a.u' + du
and v = c.v' + dv, the int8 vectors u' and v' rounded to the nearest integer, so every component of du
is at most a/2 and every component of dv at most c/2. The int8 score a.c.(u'.v') differs from u.v by

    u.v - a.c.(u'.v') = a.(u'.dv) + c.(v'.du) + du.dv,    at most    a.c.(|u'|_1 / 2 + |v'|_1 / 2 + D / 4)

(L1 norms of the int8 vectors; the largest |v'|_1 of the catalog). An item left out of a row's
candidates has an int8 score no higher than the last candidate's, so its exact score is at most
that plus the bound. When this is below the k-th best exact score among the candidates, no item
outside them can enter the top-k: the row's answer is exact. A row for which this holds, or whose
candidates are all of its unseen items, is certified; any other is ranked again with four times
the candidates (`INT8_WIDER`), and if still not certified, by the float path. Of equal scores the
lower item index ranks first, as in the float ranking; scores are the float32 products of the same
vectors, so they can differ from the float path's in the last bits (another order of summation).
"""

from __future__ import annotations

import numpy as np
import torch

from model import kernels

# Items per block of int8 products: 256 users x 2,048 items of int32 scores is 2 MiB, close to one
# core's cache. In a script not in the repo (indicative), 1,024 and 2,048 were the fastest of 1,024
# to 8,192 at 100,000 items; 8,192 was up to 18% slower.
INT8_BLOCK_ITEMS = 2048
# Candidates kept per row: 64 for k = 10. Too few and the bound certifies fewer rows, each of the
# rest ranked again in float32; too many and the heap and the float32 scores cost more. At 100,000
# items, 64 was the cheapest of 32 to 96 (`ksr bench step --checkpoint runs/synth-1m-ckpt --json`:
# `rank_int8_by_candidates`).
CANDIDATES_PER_K = 6
CANDIDATES_MIN = 64
# Rows not certified are ranked again on int8 products with this many times the candidates, and
# only those still not certified in float32: a few rows' int8 products cost a fraction of their
# float32 ranking, which reads the whole float32 item matrix.
INT8_WIDER = 4
# Slack over the bound for float32's own rounding of the exact scores (relative to their size).
ROUNDING_SLACK = 1e-4


class Int8Catalog:
    """The item matrix (N, D) as int8 blocks with one scale, and what the bound needs."""

    def __init__(self, item_vectors: torch.Tensor, block_items: int = INT8_BLOCK_ITEMS) -> None:
        peak = float(item_vectors.abs().max()) if item_vectors.numel() else 0.0
        if not np.isfinite(peak):
            raise ValueError("the item vectors hold NaN or infinite values")
        self.scale = peak / 127 if peak > 0 else 1.0
        quantized = torch.round(item_vectors / self.scale).to(torch.int8)
        # The float32 vectors, for the candidates' exact scores (the same memory when contiguous).
        self.item_vectors = np.ascontiguousarray(item_vectors.detach().numpy())
        self.block_items = block_items
        # (D, block) each, contiguous: `torch._int_mm(users, block)` reads them as they lie.
        self.blocks = [quantized[s : s + block_items].T.contiguous() for s in range(0, len(quantized), block_items)]
        self.item_l1_max = int(quantized.to(torch.int32).abs().sum(dim=1).max()) if len(quantized) else 0

    @staticmethod
    def quantize_users(user_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row rounded to int8 with its own scale: (B, D) int8 and the scales (B, 1)."""
        peak = user_vectors.abs().amax(dim=1, keepdim=True)
        scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
        return torch.round(user_vectors / scale).to(torch.int8), scale

    def error_bound(self, users: torch.Tensor, user_scale: torch.Tensor) -> torch.Tensor:
        """Per row (B,), float64: the most the int8 score of any item can differ from its exact score
        (the module's docstring derives it)."""
        l1 = users.to(torch.int32).abs().sum(dim=1).double()
        return user_scale.squeeze(1).double() * self.scale * (l1 / 2 + self.item_l1_max / 2 + users.shape[1] / 4)

    def candidates(self, k: int) -> int:
        """Candidates kept per row for a top-k."""
        return max(CANDIDATES_PER_K * k, CANDIDATES_MIN)

    def top_k(
        self, user_vectors: torch.Tensor, seen_starts: np.ndarray, seen_items: np.ndarray, k: int,
        candidates: int,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Each row's top-k (scores (B, k) float32, items (B, k)) among its unseen items, and which
        rows are certified exact (B,) bool. Rows not certified hold the candidates' best, to be
        ranked again by the caller. Seen items: row b's are seen_items[seen_starts[b]:seen_starts[b + 1]].
        `candidates`: kept per row (`candidates(k)` is the rule; at least k are kept)."""
        batch = user_vectors.shape[0]
        width = max(candidates, k)
        # A row with NaN or inf has no bound: it is ranked on zeros here, left uncertified, and the
        # caller's float path ranks it as it ranks any such row.
        finite = torch.isfinite(user_vectors).all(dim=1)
        if not bool(finite.all()):
            user_vectors = torch.where(finite.unsqueeze(1), user_vectors, 0.0)
        users, user_scale = self.quantize_users(user_vectors)
        best = np.full((batch, width), kernels.INT32_MIN, dtype=np.int32)
        best_items = np.zeros((batch, width), dtype=np.int64)
        for number, block in enumerate(self.blocks):
            scores = torch._int_mm(users, block)  # (B, block) int32, fresh: the kernel overwrites it
            kernels.heap_top_k_unseen_int(scores.numpy(), number * self.block_items, seen_starts,
                                          seen_items, best, best_items)
        # The candidates scored again in float32, ranked by score, then lower item first.
        top_scores = np.full((batch, k), -np.inf, dtype=np.float32)
        top_items = np.zeros((batch, k), dtype=np.int64)
        kernels.rank_candidates(self.item_vectors, np.ascontiguousarray(user_vectors.numpy()), best,
                                best_items, top_scores, top_items)
        top_scores, top_items = torch.from_numpy(top_scores), torch.from_numpy(top_items)
        # The certificate, in float64 on (B,) values.
        last = torch.from_numpy(best[:, 0].astype(np.float64))  # each heap's smallest
        kth = top_scores[:, -1].double()
        outside_best = (user_scale.squeeze(1).double() * self.scale * last + self.error_bound(users, user_scale)
                        + ROUNDING_SLACK * (1 + kth.abs()))
        complete = last == kernels.INT32_MIN  # every unseen item is a candidate
        certified = (complete | (outside_best < kth)) & finite
        return top_scores, top_items, certified.numpy()
