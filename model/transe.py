"""TransE (Bordes et al., 2013): knowledge-base embeddings with head + relation ~ tail.

KSR writes e_i + r_a into the memory slot of relation a, which is TransE's guess of the tail entity
that item i has for relation a. The embeddings are trained once on the data set's triples, before the
recommender, and frozen by default so memory values stay valid across fine-tunes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from model.config import TransEConfig


@dataclass
class TransEEmbeddings:
    """Trained vectors: entities (n_entities, dim) and relations (n_relations, dim)."""

    entities: torch.Tensor
    relations: torch.Tensor
    final_loss: float


def train_transe(
    triples: np.ndarray,
    n_entities: int,
    n_relations: int,
    config: TransEConfig = TransEConfig(),
    progress: bool = True,
) -> TransEEmbeddings:
    """Train TransE with the margin ranking loss on (head, relation, tail) index triples.

    Negatives corrupt the head or the tail (each with probability 1/2) with a uniform entity.
    Entity vectors are renormalised to unit length before each batch, as in the paper.
    """
    if config.norm not in (1, 2):
        raise ValueError(f"TransE norm must be 1 or 2, got {config.norm}")
    if len(triples) == 0:
        raise ValueError("TransE needs at least one triple: the data set has no knowledge graph")
    generator = torch.Generator().manual_seed(config.seed)
    bound = 6.0 / config.dim**0.5
    entities = (torch.rand(n_entities, config.dim, generator=generator) * 2 - 1) * bound
    relations = (torch.rand(n_relations, config.dim, generator=generator) * 2 - 1) * bound
    relations = F.normalize(relations, dim=-1)
    entities.requires_grad_(True)
    relations.requires_grad_(True)
    optimizer = torch.optim.Adam([entities, relations], lr=config.lr)
    data = torch.tensor(triples, dtype=torch.long)  # a copy: dataset arrays are read-only
    loss_value = float("nan")
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for start in range(0, len(data), config.batch_size):
            batch = data[order[start : start + config.batch_size]]
            heads, rels, tails = batch[:, 0], batch[:, 1], batch[:, 2]
            corrupt = torch.randint(0, n_entities, (len(batch),), generator=generator)
            corrupt_head = torch.rand(len(batch), generator=generator) < 0.5
            neg_heads = torch.where(corrupt_head, corrupt, heads)
            neg_tails = torch.where(corrupt_head, tails, corrupt)
            with torch.no_grad():
                entities.data = F.normalize(entities.data, dim=-1)
            positive = _distance(entities[heads] + relations[rels] - entities[tails], config.norm)
            negative = _distance(entities[neg_heads] + relations[rels] - entities[neg_tails], config.norm)
            loss = F.relu(config.margin + positive - negative).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        loss_value = total / len(data)
        if progress and (epoch + 1) % 10 == 0:
            print(f"transe: epoch {epoch + 1}/{config.epochs} loss {loss_value:.4f}", file=sys.stderr)
    with torch.no_grad():
        final_entities = F.normalize(entities.detach(), dim=-1)
    return TransEEmbeddings(final_entities, relations.detach().clone(), loss_value)


def _distance(difference: torch.Tensor, norm: int) -> torch.Tensor:
    return difference.abs().sum(-1) if norm == 1 else difference.pow(2).sum(-1).sqrt()
