"""From a data set's knowledge graph to what KSR's memory needs.

The memory relations are relations whose head is an item's entity, chosen by coverage (the number of
catalog items that head at least one triple of that relation). Items without an entity are marked so
that the model skips their memory write, explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.data import Dataset
from model.transe import TransEEmbeddings


@dataclass
class ItemKnowledge:
    """Frozen KB inputs of the model, aligned with the data set's item indices."""

    relation_tokens: list[str]  # the A memory relations, in slot order
    relation_coverage: list[int]  # items covered per memory relation
    item_entity_vectors: torch.Tensor  # (N, D), zero rows for items without an entity
    item_has_entity: torch.Tensor  # (N,) bool
    item_relation_mask: torch.Tensor  # (N, A) bool: the item heads a triple of relation a
    relation_keys: torch.Tensor  # (A, D)


def relation_coverage(dataset: Dataset) -> np.ndarray:
    """Per relation of the KG, how many catalog items head at least one triple of it: (R,)."""
    return item_relation_matrix(dataset).sum(0)


def item_relation_matrix(dataset: Dataset) -> np.ndarray:
    """(N, R) bool: item i heads at least one triple of relation r."""
    # Through the entities, so that items linked to one entity each get its relations.
    entity_relations = np.zeros((dataset.n_entities, dataset.n_relations), dtype=bool)
    if len(dataset.triples):
        entity_relations[dataset.triples[:, 0], dataset.triples[:, 1]] = True
    matrix = np.zeros((dataset.n_items, dataset.n_relations), dtype=bool)
    linked = dataset.item_entity >= 0
    matrix[linked] = entity_relations[dataset.item_entity[linked]]
    return matrix


def choose_relations(dataset: Dataset, count: int, min_coverage: int = 1) -> list[int]:
    """The `count` relations with the widest item coverage (ties by relation index)."""
    coverage = relation_coverage(dataset)
    order = sorted(range(len(coverage)), key=lambda r: (-coverage[r], r))
    chosen = [r for r in order if coverage[r] >= min_coverage][:count]
    if not chosen:
        raise ValueError(
            f"{dataset.name}: no relation has an item as head; train with --model gru4rec, "
            "or add .kg/.link files that link items to entities"
        )
    return chosen


def build_item_knowledge(
    dataset: Dataset, embeddings: TransEEmbeddings, relations: list[int]
) -> ItemKnowledge:
    """Gather e_i per item and r_a per memory relation from trained TransE vectors."""
    dim = embeddings.entities.shape[1]
    has_entity = torch.as_tensor(dataset.item_entity >= 0)
    vectors = torch.zeros(dataset.n_items, dim)
    vectors[has_entity] = embeddings.entities[torch.as_tensor(dataset.item_entity[has_entity.numpy()])]
    mask = torch.as_tensor(item_relation_matrix(dataset)[:, relations])
    coverage = relation_coverage(dataset)
    return ItemKnowledge(
        relation_tokens=[dataset.relation_tokens[r] for r in relations],
        relation_coverage=[int(coverage[r]) for r in relations],
        item_entity_vectors=vectors,
        item_has_entity=has_entity,
        item_relation_mask=mask,
        relation_keys=embeddings.relations[relations].clone(),
    )
