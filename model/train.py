"""Training: TransE on the KG, then KSR (or GRU4Rec, or Pop) with early stopping on validation.

The recommender is trained with a next-item loss at every position of each user's training
sequence (one forward per batch of users covers all their prefixes, which is what RecBole's prefix
augmentation computes one prefix at a time). The epoch kept is the one with the best validation
NDCG@10; training stops after `patience` epochs without a gain.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from model import checkpoint
from model.config import KSRConfig, TrainConfig, TransEConfig
from model.data import Dataset
from model.evaluate import LeaveOneOut, evaluate_loo_ksr, evaluate_loo_pop, pad
from model.knowledge import ItemKnowledge, build_item_knowledge, choose_relations
from model.ksr import KSR, sequence_loss
from model.transe import TransEEmbeddings, train_transe


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run with the same settings repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def item_popularity(sequences: list[np.ndarray], n_items: int) -> torch.Tensor:
    """How often each item occurs in the sequences: (N,) float, the padding row included (0)."""
    items = np.concatenate([s for s in sequences if len(s)] or [np.zeros(0, dtype=np.int64)])
    return torch.as_tensor(np.bincount(items, minlength=n_items), dtype=torch.float32)


def transe_embeddings(dataset: Dataset, config: TransEConfig) -> TransEEmbeddings:
    """Train TransE, or reuse the vectors cached for this data fingerprint and these settings."""
    key = hashlib.sha256(
        json.dumps([dataset.fingerprint, config.to_dict()], sort_keys=True).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("KSR_CACHE_DIR", Path.home() / ".cache" / "ksr-stream")) / "transe"
    path = cache / f"{dataset.name}-{key}.pt"
    if path.is_file():
        tensors = torch.load(path, weights_only=True)
        _log(f"transe: reusing {path}")
        return TransEEmbeddings(tensors["entities"], tensors["relations"], float(tensors["loss"]))
    _log(f"transe: training on {len(dataset.triples)} triples ({config.epochs} epochs, dim {config.dim})")
    embeddings = train_transe(dataset.triples, dataset.n_entities, dataset.n_relations, config)
    cache.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(
        {"entities": embeddings.entities, "relations": embeddings.relations,
         "loss": torch.tensor(embeddings.final_loss)},
        staging,
    )
    os.replace(staging, path)
    return embeddings


def build_model(
    dataset: Dataset, config: TrainConfig, model_config: KSRConfig, transe: TransEConfig
) -> tuple[KSR, ItemKnowledge | None]:
    """A fresh model for the data set: KSR with its KB inputs, or the GRU4Rec ablation."""
    if config.model == "gru4rec":
        model = KSR(replace(model_config, n_items=dataset.n_items, n_relations=0, memory=False))
        knowledge = None
    else:
        embeddings = transe_embeddings(dataset, transe)
        knowledge = build_item_knowledge(dataset, embeddings, choose_relations(dataset, config.relations))
        model_config = replace(
            model_config,
            n_items=dataset.n_items,
            n_relations=len(knowledge.relation_tokens),
            kb_dim=transe.dim,
            memory=True,
        )
        model = KSR(
            model_config,
            knowledge.item_entity_vectors,
            knowledge.item_has_entity,
            knowledge.item_relation_mask,
            knowledge.relation_keys,
        )
    initialise_item_embeddings(model, config.item_init_std)
    return model, knowledge


@torch.no_grad()
def initialise_item_embeddings(model: KSR, std: float | None) -> None:
    """Draw the item embeddings q from N(0, std^2) (padding row 0 stays zero); None keeps PyTorch's
    N(0, 1), whose scale Adam's small steps barely move in a few thousand updates."""
    if std is None:
        return
    weight = model.item_embedding.weight
    weight.normal_(0.0, std)
    weight[0] = 0.0


def training_windows(sequences: list[np.ndarray], max_len: int) -> list[tuple[np.ndarray, int]]:
    """The training samples: (items, skip) pairs, where the user vector after position i of `items`
    predicts items[i + 1] for every i >= skip (the first `skip` positions only build up the state).

    max_len 0: each sequence of two items or more whole, skip 0. max_len L > 0: a sequence's targets
    (its items after the first) in runs of L; a run starting at index a is fed the items from
    max(0, a - L), so each target has at least min(L, its history) items before it.
    """
    if max_len <= 0:
        return [(s, 0) for s in sequences if len(s) >= 2]
    windows = []
    for s in sequences:
        for a in range(1, len(s), max_len):
            start = max(0, a - max_len)
            windows.append((s[start : min(len(s), a + max_len)], a - start - 1))
    return windows


def _batches(samples: list[tuple[np.ndarray, int]], batch_users: int,
             generator: random.Random) -> list[list[tuple[np.ndarray, int]]]:
    """Samples grouped by similar length (little padding), batches in random order."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i][0]), generator.random()))
    batches = [[samples[i] for i in order[j : j + batch_users]] for j in range(0, len(order), batch_users)]
    generator.shuffle(batches)
    return batches


def batch_tensors(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of (items, skip) samples: (B, T) right-padded ids, (B,) lengths, and (B, T - 1) which
    positions' user vectors are trained (position t predicts the item at t + 1, from each skip on)."""
    items, lengths = pad([window for window, _ in batch])
    skips = torch.tensor([skip for _, skip in batch])
    positions = torch.arange(items.shape[1] - 1).unsqueeze(0)
    return items, lengths, (positions < (lengths - 1).unsqueeze(1)) & (positions >= skips.unsqueeze(1))


def seen_items(items: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, T) right-padded item ids -> (B, T, N) bool: the items consumed at or before each position.

    An item is seen from the first position that holds it on; padding (item 0) is never seen.
    """
    batch, steps = items.shape
    first = torch.full((batch, n_items), steps, dtype=torch.long)
    positions = torch.arange(steps).expand(batch, steps)
    first.scatter_reduce_(1, items, positions, reduce="amin")
    first[:, 0] = steps
    return first.unsqueeze(1) <= torch.arange(steps).view(1, steps, 1)


def future_targets(items: torch.Tensor, count: int) -> torch.Tensor:
    """(B, T) right-padded ids -> (B, T - 1, count - 1): for the position that predicts items[:, t + 1],
    the items at t + 2 .. t + count (0, the padding id, past the sequence's end)."""
    steps = items.shape[1]
    padded = F.pad(items, (0, count - 1))
    return torch.stack([padded[:, 1 + j : steps + j] for j in range(1, count)], dim=2)


def shuffle_within_ties(sequences: list[np.ndarray], stamps: list[np.ndarray],
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Each sequence with the order of its same-timestamp events drawn at random (stamps sorted
    ascending, one per item); events at different times keep their order."""
    return [s[np.lexsort((rng.random(len(s)), t))] for s, t in zip(sequences, stamps)]


@torch.no_grad()
def update_average(averaged: KSR, model: KSR, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model, parameter by parameter."""
    for mine, theirs in zip(averaged.parameters(), model.parameters()):
        mine.lerp_(theirs, 1.0 - decay)


def train_epoch(
    model: KSR,
    optimizer: torch.optim.Optimizer,
    sequences: list[np.ndarray],
    config: TrainConfig,
    generator: random.Random,
    negative_weights: torch.Tensor | None = None,
    averaged: KSR | None = None,
) -> float:
    """One pass over the training sequences; returns the mean loss per predicted position.

    `averaged`: a copy of the model whose weights follow `model`'s as an exponential moving average
    (decay `config.ema` per optimizer step).
    """
    model.train()
    total, positions = 0.0, 0
    for batch in _batches(training_windows(sequences, config.max_len), config.batch_users, generator):
        items, lengths, valid = batch_tensors(batch)
        user_vectors, _, _ = model(items[:, :-1], lengths - 1)
        targets = items[:, 1:][valid]
        negatives = seen = None
        if config.loss == "bpr":
            negatives = torch.multinomial(negative_weights, len(targets), replacement=True)
        if config.seen_penalty > 0:
            seen = seen_items(items[:, :-1], model.config.n_items)[valid]
        future = future_targets(items, config.future_targets)[valid] if config.future_targets > 1 else None
        loss = sequence_loss(model, user_vectors[valid], targets, config.loss, negatives,
                             seen, config.seen_penalty, config.label_smoothing, future, config.future_decay)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if averaged is not None:
            update_average(averaged, model, config.ema)
        total += loss.item() * len(targets)
        positions += len(targets)
    return total / max(positions, 1)


def train(
    dataset: Dataset,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    model_config: KSRConfig | None = None,
    transe: TransEConfig | None = None,
) -> dict:
    """Train a model on the leave-one-out split, save the best epoch as a checkpoint at `out`.

    Returns the checkpoint's metadata (which includes validation and test metrics).
    """
    transe = transe or TransEConfig()
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    split = LeaveOneOut.from_dataset(dataset)
    sequences = split.train_sequences()
    popularity = item_popularity(sequences, dataset.n_items)
    base_meta = {
        "model": config.model,
        "item_tokens": dataset.item_tokens,
        "dataset": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "users": dataset.n_users,
            "items": dataset.n_items - 1,
            "events": dataset.n_events,
        },
        "train": config.to_dict(),
    }
    started = time.perf_counter()
    if config.model == "pop":
        result = evaluate_loo_pop(popularity, split)
        meta = {**base_meta, "metrics": result, "train_seconds": time.perf_counter() - started}
        checkpoint.save(out, meta, popularity=popularity)
        _log(f"pop: valid {result['valid']}  test {result['test']}")
        return meta
    if config.model not in ("ksr", "gru4rec"):
        raise ValueError(f"unknown model {config.model!r}: use ksr, gru4rec or pop")

    model_config = model_config or KSRConfig(n_items=dataset.n_items, n_relations=0)
    model, knowledge = build_model(dataset, config, model_config, transe)
    transe_seconds = time.perf_counter() - started
    # Frozen KB buffers are not parameters, so the optimizer never touches them.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_decay, patience=config.lr_patience, threshold=0.0)
        if config.lr_decay > 0 else None)
    generator = random.Random(config.seed)
    negative_weights = popularity.clone()
    negative_weights[0] = 0
    best = {"epoch": -1, "valid": {"ndcg@10": -1.0}}
    if config.epochs == 0:
        # A serving checkpoint with the initial weights (and whatever TransE learned): for load
        # tests on catalogs too large to evaluate, never for quality.
        _log(f"{config.model}: --epochs 0: writing the initial weights, no training or evaluation")
        best = {"epoch": 0, "valid": None, "test": None}
    # With an average, it is what is evaluated, selected and saved; the raw weights only train.
    averaged = copy.deepcopy(model) if config.ema > 0 else None
    kept = averaged if averaged is not None else model
    best_state = copy.deepcopy(kept.state_dict())
    history = []
    epochs_started = time.perf_counter()
    stamps = LeaveOneOut.training_part(dataset.user_timestamps()) if config.shuffle_ties else None
    tie_rng = np.random.default_rng(config.seed)
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        epoch_sequences = sequences if stamps is None else shuffle_within_ties(sequences, stamps, tie_rng)
        loss = train_epoch(model, optimizer, epoch_sequences, config, generator, negative_weights, averaged)
        result = evaluate_loo_ksr(kept, split)
        seconds = time.perf_counter() - epoch_started
        history.append({"epoch": epoch, "loss": loss, "valid_ndcg@10": result["valid"]["ndcg@10"],
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)})
        if scheduler is not None:
            scheduler.step(result["valid"]["ndcg@10"])
        improved = result["valid"]["ndcg@10"] > best["valid"]["ndcg@10"]
        if improved:
            best = {"epoch": epoch, **result}
            best_state = copy.deepcopy(kept.state_dict())
        _log(
            f"{config.model}: epoch {epoch} loss {loss:.4f} valid ndcg@10 "
            f"{result['valid']['ndcg@10']:.4f} hit@10 {result['valid']['hit@10']:.4f}"
            f"{' (best)' if improved else ''} {seconds:.1f}s"
        )
        if epoch - best["epoch"] >= config.patience:
            _log(f"{config.model}: no gain for {config.patience} epochs, stopping")
            break
        if config.max_minutes is not None and time.perf_counter() - epochs_started > config.max_minutes * 60:
            _log(f"{config.model}: time cap of {config.max_minutes} min reached, stopping")
            break
    model.load_state_dict(best_state)
    model.eval()
    meta = {
        **base_meta,
        "relation_tokens": knowledge.relation_tokens if knowledge else [],
        "relation_coverage": knowledge.relation_coverage if knowledge else [],
        "transe": transe.to_dict() if knowledge else None,
        "metrics": {"valid": best["valid"], "test": best["test"], "best_epoch": best["epoch"]},
        "history": history,
        "train_seconds": round(time.perf_counter() - started, 1),
        "transe_seconds": round(transe_seconds, 1),
        "epochs_run": len(history),
    }
    checkpoint.save(out, meta, model=model)
    _log(f"{config.model}: best epoch {best['epoch']}: valid {best['valid']} test {best['test']}")
    return meta
