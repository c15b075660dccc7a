"""`ksr bench step`: the serving step's speed, beside recomputing a user from scratch.

Measures one batched model step plus top-k over the catalog (what the worker does per batch) at
several batch sizes, and the baseline a stateless recommender would pay: replaying a user's last
200 events through the model for every new event. Both run in the same process, same threads.
"""

from __future__ import annotations

import statistics
import time

import torch

from model.checkpoint import Checkpoint
from model.ksr import KSR, KSRConfig
from model.serving import RANK_BLOCK_ITEMS, Recommender


def _synthetic_recommender(n_items: int, relations: int, seed: int = 0) -> Recommender:
    """A KSR with the default settings (sizes, cosine scores) and random KB inputs, for timing when
    no checkpoint is given."""
    generator = torch.Generator().manual_seed(seed)
    config = KSRConfig(n_items=n_items, n_relations=relations)
    has_entity = torch.rand(n_items, generator=generator) < 0.95
    model = KSR(
        config,
        torch.randn(n_items, config.kb_dim, generator=generator) * has_entity.unsqueeze(1),
        has_entity,
        torch.rand(n_items, relations, generator=generator) < 0.5,
        torch.randn(relations, config.kb_dim, generator=generator),
    ).eval()
    meta = {"model": "ksr", "version": 1, "item_tokens": ["[PAD]"] + [str(i) for i in range(1, n_items)],
            "relation_tokens": [f"r{a}" for a in range(relations)]}
    return Recommender(Checkpoint(meta, model, None), ranking_precision="float32")


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def bench_step(
    checkpoint: str | None = None,
    n_items: int = 1683,
    relations: int = 10,
    batches: tuple[int, ...] = (1, 64, 512),
    history: int = 200,
    repeats: int = 20,
    threads: int = 1,
    k: int = 10,
) -> dict:
    """Events per second of step + top-k per batch size, and the speedup over recomputation."""
    torch.set_num_threads(threads)
    # float32 ranking throughout but where int8 is timed beside it (by default a large catalog gets int8).
    recommender = (Recommender.load(checkpoint, ranking_precision="float32") if checkpoint
                   else _synthetic_recommender(n_items, relations))
    catalog = recommender.n_items
    generator = torch.Generator().manual_seed(1)
    result: dict = {"catalog": catalog - 1, "threads": threads, "k": k, "history": history,
                    "model": recommender.model.config.to_dict()}
    per_event = {}
    for batch in batches:
        histories = torch.randint(1, catalog, (batch, 20), generator=generator)
        state = recommender.model.replay(histories)
        seen = histories.tolist()
        items = torch.randint(1, catalog, (batch,), generator=generator)
        seconds = _median_seconds(
            lambda state=state, items=items, seen=seen: recommender.advance(state, items, seen, k), repeats
        )
        per_event[batch] = seconds / batch
        result[f"events_per_s_batch_{batch}"] = round(batch / seconds, 1)

    # Ranking alone at the largest batch: the catalog scored in blocks (what serving does) beside
    # the whole (B, N) score matrix at once (the baseline), same users, same seen items.
    users = torch.randn(largest := max(batches), recommender.item_vectors.shape[1], generator=generator)
    seen = torch.randint(1, catalog, (largest, 20), generator=generator).tolist()
    for name, block in (("blocks", recommender.rank_block_items), ("whole_catalog", catalog)):
        recommender.rank_block_items = block
        seconds = _median_seconds(lambda: recommender._top_k(users, seen, k), repeats)
        result[f"rank_ms_per_event_{name}"] = round(seconds / largest * 1000, 4)
    recommender.rank_block_items = RANK_BLOCK_ITEMS
    # The floor of any exact ranking: every item's score, the products alone, block by block as
    # the ranking computes them (a block's scores stay in the cache), with no top-k or seen filter.
    item_vectors = recommender.item_vectors
    blocks = [item_vectors[start : start + recommender.rank_block_items].T
              for start in range(0, catalog, recommender.rank_block_items)]

    def score_every_item() -> None:
        for block in blocks:
            users @ block

    seconds = _median_seconds(score_every_item, repeats)
    result["score_ms_per_event"] = round(seconds / largest * 1000, 4)
    result["score_gflops"] = round(2 * largest * catalog * item_vectors.shape[1] / seconds / 1e9, 1)

    # The ranking on int8 products (KSR_RANKING_PRECISION=int8) beside the float32 one, on the same
    # users (the model's vectors after 20 random events) and seen items, at three batch sizes: ms per
    # event, the int8 time including the rows the bound did not certify, ranked again.
    quantized = Recommender(recommender.checkpoint, compiled=True, ranking_precision="int8")
    by_precision = {}
    for batch in sorted({1, 16, largest}):
        state = recommender.model.replay(torch.randint(1, catalog, (batch, 20), generator=generator))
        vectors, _ = recommender.user_vectors(state)
        seen_rows = torch.randint(1, catalog, (batch, 20), generator=generator).tolist()
        by_precision[str(batch)] = {
            name: round(_median_seconds(lambda r=serving, u=vectors, s=seen_rows: r._top_k(u, s, k), repeats)
                        / batch * 1000, 4)
            for name, serving in (("float32", recommender), ("int8", quantized))
        }
    result["rank_ms_per_event_by_precision"] = by_precision
    # At the largest batch, by candidates per row: ms per event (the rows not certified ranked again
    # included), the shares of rows ranked again and, of all rows, ranked again in float32, and the
    # share whose items are the float ranking's (1.0 whenever the int8 ranking is right).
    _, float_items = recommender._top_k(vectors, seen_rows, k)
    result["rank_int8_by_candidates"] = {}
    for candidates in (None, 32, 48, 96):
        quantized.int8_candidates = candidates
        quantized.ranked_again = quantized.ranked_again_float = 0
        _, int8_items = quantized._top_k(vectors, seen_rows, k)
        again, again_float = quantized.ranked_again / largest, quantized.ranked_again_float / largest
        seconds = _median_seconds(lambda: quantized._top_k(vectors, seen_rows, k), repeats)
        result["rank_int8_by_candidates"][str(candidates or quantized.int8_catalog.candidates(k))] = {
            "ms_per_event": round(seconds / largest * 1000, 4), "ranked_again_share": round(again, 4),
            "ranked_again_float32_share": round(again_float, 4),
            "same_items_share": round(float((float_items == int8_items).all(dim=1).float().mean()), 4),
        }
    quantized.int8_candidates = None

    # A batch's forward (`Recommender.run`, what the worker calls) on blocks of three shapes, with
    # both serving kernels: many users with one event each, a full block of a few events each, and
    # a session-shaped block (a few users with many events, most of it padding, as ml-100k's
    # time-ordered replay gives). Microseconds per event.
    plain = Recommender(recommender.checkpoint, compiled=False)
    shapes = {"256x1": [1] * 256, "64x4": [4] * 64, "sessions_10x63": [63, 40, 30, 20, 10, 5, 3, 2, 1, 1]}
    result["run_us_per_event"] = {}
    for name, lengths in shapes.items():
        lengths_t = torch.tensor(lengths)
        items = torch.randint(1, catalog, (len(lengths), max(lengths)), generator=generator)
        items[torch.arange(max(lengths)).unsqueeze(0) >= lengths_t.unsqueeze(1)] = 0
        state = recommender.model.replay(torch.randint(1, catalog, (len(lengths), 20), generator=generator))
        figures = {}
        for kernel, serving in (("compiled", recommender), ("torch", plain)):
            seconds = _median_seconds(lambda r=serving, s=state, i=items, n=lengths_t: r.run(s, i, n), repeats)
            figures[kernel] = round(seconds / sum(lengths) * 1e6, 2)
        result["run_us_per_event"][name] = figures

    long_history = torch.randint(1, catalog, (1, history), generator=generator)
    seen_long = long_history.tolist()

    def recompute() -> None:
        state = recommender.model.replay(long_history)
        recommender.rank(state, seen_long, k)

    recompute_seconds = _median_seconds(recompute, max(3, repeats // 4))
    result["recompute_ms_per_event"] = round(recompute_seconds * 1000, 3)
    result["step_ms_per_event_at_largest_batch"] = round(per_event[largest] * 1000, 4)
    result["speedup_vs_recompute"] = round(recompute_seconds / per_event[largest], 1)
    result["events_per_s"] = {str(b): result.pop(f"events_per_s_batch_{b}") for b in batches}
    return result
