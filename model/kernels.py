"""The serving path's loops, compiled: the recurrence (equations (1) and (2) of `model/ksr.py`) for a
block of users, and the ranking of the catalog minus each user's seen items.

The worker runs each batch as a (users x steps) block (`KSR.forward(..., serving=True)`): a handful
of users with dozens of events each, so a step is a few rows. PyTorch pays its per-operation cost
(dispatch, allocation) on every one of the GRU's and the memory write's dozen operations per step,
which for rows this small is most of the time (README, Speed). This kernel runs each user's events
in one compiled loop instead: the GRU cell, the gated memory write and the evidence, cell by cell,
without any per-step allocation. Training keeps PyTorch (autograd); `tests/test_ksr.py` holds this
path to `KSR.step` like the training path.

The GRU's tanh and sigmoid use a rational approximation (the one Eigen uses for float tanh), which
the compiler can vectorise; its absolute error is below 4e-7 (tested on a dense grid over [-30, 30],
beyond which it is clamped, and at the extremes), against the 1e-5 to which the serving path is
held (`test_the_kernel_tanh_is_within_4e_7_of_tanh`).

`merge_top_k_unseen` ranks the catalog block by block (ml-100k's is one block), one pass per row
that skips the seen items as it goes (`Recommender._top_k`); `heap_top_k_unseen_int` does the same
for int8 products' int32 scores, keeping many candidates unordered, and `rank_candidates` scores
those candidates again in float32 and ranks them (`model/ranking_int8.py`).

numba compiles these once per checkout (a few seconds) and caches them next to this file;
`warm()` does it before the worker's first batch. Only the serving path imports this module.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Floating-point licences for the compiled loops: reassociate sums (vectorised dot products), fuse
# multiply-adds, divide by reciprocals, ignore the sign of zero; never assume away inf or NaN (an
# overflowing exp in the write gate is meant to give gate 0).
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
# The floor of int32 scores (`heap_top_k_unseen_int`): below every product of two int8 vectors.
INT32_MIN = np.iinfo(np.int32).min
# Entries per chunk of `heap_top_k_unseen_int`'s vectorised test: of 32, 64, 128 and 256, 64 was the fastest at
# 100,000 items (a script not in the repo, so indicative; the effect of the chunks: docs/speed.md).
HEAP_SCAN_CHUNK = 64

# tanh(x) ~ x * P(x^2) / Q(x^2) on [-TANH_CLAMP, TANH_CLAMP], where float32 tanh is within 3e-7 of +-1.
TANH_CLAMP = np.float32(7.90531110763549805)
_P = tuple(np.float32(c) for c in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03,
))
_Q = tuple(np.float32(c) for c in (
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03,
))


@numba.njit(cache=True, inline="always", fastmath=FASTMATH)
def fast_tanh(x: float) -> float:
    """tanh of a float32, as a rational function (vectorisable; see the module's docstring)."""
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = _P[0]
    p = p * x2 + _P[1]
    p = p * x2 + _P[2]
    p = p * x2 + _P[3]
    p = p * x2 + _P[4]
    p = p * x2 + _P[5]
    p = p * x2 + _P[6]
    q = _Q[0]
    q = q * x2 + _Q[1]
    q = q * x2 + _Q[2]
    q = q * x2 + _Q[3]
    return x * p / q


@numba.njit(cache=True, inline="always", fastmath=FASTMATH)
def fast_sigmoid(x: float) -> float:
    """sigmoid(x) = (1 + tanh(x / 2)) / 2."""
    half = np.float32(0.5)
    return half + half * fast_tanh(half * x)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def serving_recurrence(
    hidden0, memory0, evidence0, input_gates, lengths, weight_hh_t, bias_hh,
    entity, writes, relation_hits, relation_keys, hiddens, memory, evidence, run_gru,
):
    """Run every user's events through the GRU and the memory write, writing each valid cell.

    hidden0 (B, H), memory0 (B, A, D), evidence0 (B, A): the users' states before the block.
    input_gates (B, T, 3H): W_ih q + b_ih for every cell (one matrix product, done by PyTorch).
    lengths (B,): events per user; cells at t >= lengths[b] are neither read nor written.
    weight_hh_t (H, 3H): the GRU's W_hh transposed; bias_hh (3H,); gates in PyTorch's order r, z, n.
    entity (B, T, D): e_i of each cell's item (after the write transform, if any); writes (B, T):
    the item has a KB entity; relation_hits (B, T, A): its entity heads a triple of relation a;
    relation_keys (A, D). Outputs, filled at valid cells only: hiddens (B, T, H), memory
    (B, T, A, D), evidence (B, T, A): each user's state after each of its events.
    run_gru False: `hiddens` already holds the GRU's outputs (PyTorch's batched products, for a
    wide block), and only the write and the evidence run; input_gates is then not read.
    """
    batch, size = hidden0.shape
    relations, dims = relation_keys.shape
    gates = np.empty(3 * size, dtype=np.float32)
    h = np.empty(size, dtype=np.float32)
    v = np.empty((relations, dims), dtype=np.float32)
    e = np.empty(relations, dtype=np.float32)
    target = np.empty(dims, dtype=np.float32)
    for b in range(batch):
        h[:] = hidden0[b]
        v[:, :] = memory0[b]
        e[:] = evidence0[b]
        for t in range(lengths[b]):
            if run_gru:
                # (1): W_hh h + b_hh, as rows of W_hh^T scaled by h's entries (vectorises without
                # reassociating any sum), then the gates.
                gates[:] = bias_hh
                for k in range(size):
                    hk = h[k]
                    for j in range(3 * size):
                        gates[j] += weight_hh_t[k, j] * hk
                x = input_gates[b, t]
                for j in range(2 * size):  # r, then z: three plain loops, each vectorised
                    gates[j] = fast_sigmoid(x[j] + gates[j])
                for j in range(size):  # n = tanh(x_n + r * (W_hn h + b_hn))
                    gates[2 * size + j] = fast_tanh(x[2 * size + j] + gates[j] * gates[2 * size + j])
                for j in range(size):
                    n = gates[2 * size + j]
                    h[j] = n + gates[size + j] * (h[j] - n)  # (1 - z) n + z h
                hiddens[b, t] = h
            # (2): t_a = e_i + r_a; z_a = sigmoid(v_a . t_a); v_a <- v_a + z_a (t_a - v_a).
            if writes[b, t]:
                for a in range(relations):
                    dot = np.float32(0.0)
                    for d in range(dims):
                        target[d] = entity[b, t, d] + relation_keys[a, d]
                        dot += v[a, d] * target[d]
                    gate = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-dot)))
                    for d in range(dims):
                        v[a, d] += gate * (target[d] - v[a, d])
            memory[b, t] = v
            for a in range(relations):
                if relation_hits[b, t, a]:
                    e[a] = max(e[a], np.float32(1.0))
            evidence[b, t] = e


def warm() -> None:
    """Compile (or load from numba's cache) the kernels for the types the worker passes,
    so that a fresh process does not spend its first batch compiling (seconds, once per checkout)."""
    f32 = np.float32
    serving_recurrence(
        np.zeros((1, 1), f32), np.zeros((1, 1, 1), f32), np.zeros((1, 1), f32), np.zeros((1, 1, 3), f32),
        np.ones(1, np.int64), np.zeros((1, 3), f32), np.zeros(3, f32), np.zeros((1, 1, 1), f32),
        np.ones((1, 1), np.bool_), np.ones((1, 1, 1), np.bool_), np.zeros((1, 1), f32),
        np.empty((1, 1, 1), f32), np.empty((1, 1, 1, 1), f32), np.empty((1, 1, 1), f32), True,
    )
    merge_top_k_unseen(np.zeros((1, 2), f32), 2, np.zeros(2, np.int64), np.zeros(0, np.int64),
                       np.zeros((1, 1), f32), np.zeros((1, 1), np.int64))
    heap_top_k_unseen_int(np.zeros((1, 2), np.int32), 2, np.zeros(2, np.int64), np.zeros(0, np.int64),
                          np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int64))
    rank_candidates(np.zeros((2, 1), f32), np.zeros((1, 1), f32), np.zeros((1, 1), np.int32),
                    np.ones((1, 1), np.int64), np.full((1, 1), -np.inf, f32), np.zeros((1, 1), np.int64))


@numba.njit(cache=True, inline="always")
def insert_sorted(best, items, value, item) -> None:
    """Put `item` with score `value` into a row's top-k (`best`, `items`, best first), dropping the
    last; of equal scores the lower item first. The caller has checked that it belongs there."""
    at = best.shape[0] - 1
    while at > 0 and (best[at - 1] < value or (best[at - 1] == value and items[at - 1] > item)):
        best[at] = best[at - 1]
        items[at] = items[at - 1]
        at -= 1
    best[at] = value
    items[at] = item


@numba.njit(cache=True, nogil=True)
def merge_top_k_unseen(scores, offset, seen_starts, seen_items, top_scores, top_items):
    """Fold a block of scores (B, n), items `offset` to `offset + n - 1`, into each row's running
    top-k (`top_scores`, `top_items`, (B, k), best first; start them at -inf and 0), leaving out
    item 0 (padding) and row b's seen items `seen_items[seen_starts[b]:seen_starts[b + 1]]`
    (overwritten with -inf in `scores`). Of equal scores the lower item index ranks first when
    blocks come in item order; a row with fewer than k items left ends in -inf scores (item 0).

    One pass over each row with a running k-th best: most entries cost one comparison, instead
    of a scatter of the seen items and a top-k over the whole matrix. A large catalog is ranked
    block by block through this, each block's scores still in the cache, instead of a (B, N)
    matrix (100 MB for 256 users and 100,000 items); ml-100k's is one block.
    """
    batch, n = scores.shape
    k = top_scores.shape[1]
    for b in range(batch):
        row = scores[b]
        if offset == 0:
            row[0] = -np.inf
        for s in range(seen_starts[b], seen_starts[b + 1]):
            j = seen_items[s] - offset
            if 0 <= j < n:
                row[j] = -np.inf
        best = top_scores[b]
        items = top_items[b]
        threshold = best[k - 1]
        for j in range(n):
            value = row[j]
            if value > threshold:
                insert_sorted(best, items, value, offset + j)
                threshold = best[k - 1]


@numba.njit(cache=True, nogil=True)
def heap_top_k_unseen_int(scores, offset, seen_starts, seen_items, heap, heap_items):
    """For int32 scores (int8 products, `model/ranking_int8.py`): fold a block (B, n), items
    `offset` to `offset + n - 1`, into each row's best k kept as a min-heap (`heap`, `heap_items`,
    (B, k), in no order but the smallest at [b, 0]; start them at INT32_MIN and 0), leaving out item 0
    and the row's seen items as `merge_top_k_unseen` does (overwritten with INT32_MIN in `scores`).
    An entry enters only above the heap's smallest, in log(k) steps: the candidates are many (48 or
    more) and ranked again afterwards, so the sorted insertion of `merge_top_k_unseen`, k steps
    each, would cost more than the comparisons.

    Once the heap is full, almost no entry enters it, so the row is read HEAP_SCAN_CHUNK entries at
    a time: first whether any is above the heap's smallest, a loop the compiler vectorises (the
    slice starts its own index at 0, which spares the loop numba's check for negative indices), then
    the entry-by-entry pass only over a chunk that has one."""
    batch, n = scores.shape
    k = heap.shape[1]
    for b in range(batch):
        row = scores[b]
        if offset == 0:
            row[0] = INT32_MIN
        for s in range(seen_starts[b], seen_starts[b + 1]):
            j = seen_items[s] - offset
            if 0 <= j < n:
                row[j] = INT32_MIN
        values = heap[b]
        items = heap_items[b]
        threshold = values[0]
        for start in range(0, n, HEAP_SCAN_CHUNK):
            chunk = row[start : start + HEAP_SCAN_CHUNK]
            above = False
            for j in range(chunk.shape[0]):
                above |= chunk[j] > threshold
            if not above:
                continue
            for j in range(chunk.shape[0]):
                value = chunk[j]
                if value > threshold:
                    at = 0  # the smallest leaves; the new entry sinks from the root to its place
                    while True:
                        child = 2 * at + 1
                        if child >= k:
                            break
                        if child + 1 < k and values[child + 1] < values[child]:
                            child += 1
                        if values[child] >= value:
                            break
                        values[at] = values[child]
                        items[at] = items[child]
                        at = child
                    values[at] = value
                    items[at] = offset + start + j
                    threshold = values[0]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def rank_candidates(item_vectors, user_vectors, heap, heap_items, top_scores, top_items):
    """Score each row's candidates from `heap_top_k_unseen_int` (`heap`, `heap_items`, (B, W); an
    entry still at INT32_MIN holds no item) in float32, item_vectors[item] . user_vectors[b], and
    keep the best k of them (`top_scores`, `top_items`, (B, k), best first; start them at -inf and
    0): of equal scores the lower item first. A row with fewer than k candidates ends in -inf scores
    (item 0). One pass per row, reading the candidates' vectors where they lie, instead of gathering
    a (B, W, D) copy of them and sorting twice (`model/ranking_int8.py`)."""
    batch, width = heap.shape
    k = top_scores.shape[1]
    dim = user_vectors.shape[1]
    for b in range(batch):
        user = user_vectors[b]
        best = top_scores[b]
        items = top_items[b]
        for w in range(width):
            if heap[b, w] == INT32_MIN:
                continue
            item = heap_items[b, w]
            vector = item_vectors[item]
            value = np.float32(0.0)
            for d in range(dim):
                value += vector[d] * user[d]
            if value > best[k - 1] or (value == best[k - 1] and item < items[k - 1]):
                insert_sorted(best, items, value, item)
