"""`ksr data synth`: synthetic data sets of any size with a knowledge graph of ml-100k's shape.

The output is a folder ``NAME`` of RecBole atomic files ``NAME.inter``, ``NAME.kg`` and
``NAME.link`` that :func:`model.data.load` reads like any other data set; it exists for scale
benchmarks (a million users, a hundred thousand items), not for judging recommendation quality:
the events carry no sequential signal.

What is generated, for ``users`` U, ``items`` I and ``events`` E (default ``max(U, I)``, that is
one event per user on average):

* Events. Every user and every item appears at least once, so ``E >= max(U, I)`` is required:
  U events cover users 1..U once each and the other E - U draw users uniformly; I events cover
  items 1..I once each and the other E - I draw items from a Zipf law of exponent
  :data:`ITEM_ZIPF_EXPONENT` (1.0, a fixed choice: a single power law fits ml-100k poorly, its
  log-log slope is about -0.5 over the top 500 items and -1.4 over all of them) over a random
  ranking of the items. Both columns are shuffled independently. Ratings follow ml-100k's
  rating histogram. Timestamps start at 2026-01-01T00:00:00Z and increase by 1 s per event plus
  a jitter of 0 to 0.999 s (millisecond resolution), so they are strictly increasing and the file
  is already in time order.
* Links. ``round(linked_fraction * I)`` items, chosen at random, link to their own entity
  (``m.<n>``); since every item has events, every linked item passes the loader's checks.
* Knowledge graph, measured from the model data set by :func:`measure_shape` and scaled to I.
  Per relation (ml-100k's 24 relation names, written in ml-100k's order so relation indices
  match), triples fall into four blocks by whether the head and the tail are item entities:
  item -> entity (coverage: the fraction of linked items that head one; tails per head; distinct
  tail entities per item of the catalog), item -> item (coverage; tails per head), entity -> item
  (triples and distinct heads per item) and entity -> entity (triples and distinct entities per
  item; ml-100k has none). Coverage is met exactly (up to rounding); tails per head are
  ``1 + Poisson(mean - 1)``; the tail pool has the scaled number of entities, each used at least
  once, the rest drawn from a Zipf law (exponent 1) over the pool; duplicate triples are dropped,
  which trims tails per head a little where pools are small. A relation that ml-100k holds as
  the mirror image of another (``film.director.film`` of ``film.film.directed_by``) is written
  as the exact flip of it. Entity pools are separate per relation, so the entity count runs
  about 5% above ml-100k's scaled figure (ml-100k shares people between directors, writers and
  producers). Any block that ml-100k has is given at least one triple, so every relation name
  appears at any size.

The same arguments and seed always give the same bytes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.data import DataError, Dataset

__all__ = [
    "ITEM_ZIPF_EXPONENT",
    "ML_100K",
    "RelationShape",
    "Shape",
    "SynthResult",
    "measure_shape",
    "synth",
    "synth_with_stats",
]

ITEM_ZIPF_EXPONENT = 1.0
START_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
# ml-100k's rating histogram (ratings 1..5: 6110, 11370, 27145, 34174, 21201 of 100000 events).
_RATING_WEIGHTS = np.array([6110, 11370, 27145, 34174, 21201], dtype=np.float64) / 100_000
_CHUNK = 1 << 19  # rows per buffered write


def _log(msg: str) -> None:
    print(f"synth: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class RelationShape:
    """One relation's share of the KG, as ratios that scale with the catalog.

    ``*_coverage`` are fractions of the linked items; ``*_per_head`` means over the heads that
    have such a triple; every other ratio is a count divided by the number of items. A relation
    with ``inverse_of`` set is generated as the flipped triples of that relation (its other
    fields are then zero).
    """

    name: str
    inverse_of: str | None = None
    ie_coverage: float = 0.0  # item -> entity: fraction of linked items heading one
    ie_per_head: float = 0.0  # ... mean tails per such item
    ie_tails: float = 0.0  # ... distinct tail entities / items
    ii_coverage: float = 0.0  # item -> item: fraction of linked items heading one
    ii_per_head: float = 0.0  # ... mean item tails per such item
    ei_triples: float = 0.0  # entity -> item: triples / items
    ei_heads: float = 0.0  # ... distinct head entities / items
    ee_triples: float = 0.0  # entity -> entity: triples / items
    ee_entities: float = 0.0  # ... distinct entities / items


@dataclass(frozen=True)
class Shape:
    """What :func:`synth` copies from a data set: link rate and per-relation KG ratios."""

    name: str
    linked_fraction: float
    relations: tuple[RelationShape, ...] = field(default_factory=tuple)


def _r(x: float) -> float:
    return round(float(x), 4)


def _inverse_pairs(triples: np.ndarray, n_relations: int, n_entities: int,
                   item_headed: np.ndarray) -> dict[int, int]:
    """relation -> its base, for relations whose triples are the flip of another's (>= 90%
    of them, with sizes within 10%); the base is the one with more item-headed triples."""
    keys = [np.unique(triples[triples[:, 1] == r][:, [0, 2]] @ np.array([n_entities, 1]))
            for r in range(n_relations)]
    flipped = [np.unique(triples[triples[:, 1] == r][:, [2, 0]] @ np.array([n_entities, 1]))
               for r in range(n_relations)]
    inverse: dict[int, int] = {}
    for b in range(n_relations):
        for a in range(n_relations):
            if a == b or a in inverse or not keys[a].size or not keys[b].size:
                continue
            if not 0.9 <= keys[b].size / keys[a].size <= 1.1:
                continue
            if np.isin(flipped[b], keys[a], assume_unique=True).mean() < 0.9:
                continue
            if (item_headed[a], -a) > (item_headed[b], -b):
                inverse[b] = a
                break
    return inverse


def measure_shape(dataset: Dataset, name: str | None = None) -> Shape:
    """The link rate and per-relation KG ratios of ``dataset`` (see :class:`RelationShape`),
    rounded to 4 decimals."""
    n_items = dataset.n_items - 1
    ents = dataset.item_entity[1:]
    n_linked = int(np.count_nonzero(ents >= 0))
    if n_items <= 0 or n_linked == 0:
        raise DataError(f"{dataset.name} has no item linked to a KG entity: no shape to copy")
    is_item = np.zeros(dataset.n_entities, dtype=bool)
    is_item[ents[ents >= 0]] = True
    t = dataset.triples
    heads_item, tails_item = is_item[t[:, 0]], is_item[t[:, 2]]
    item_headed = np.bincount(t[heads_item, 1], minlength=dataset.n_relations)
    inverse = _inverse_pairs(t, dataset.n_relations, dataset.n_entities, item_headed)

    relations = []
    for r, rel in enumerate(dataset.relation_tokens):
        if r in inverse:
            relations.append(RelationShape(rel, inverse_of=dataset.relation_tokens[inverse[r]]))
            continue
        m = t[:, 1] == r
        ie, ii = m & heads_item & ~tails_item, m & heads_item & tails_item
        ei, ee = m & ~heads_item & tails_item, m & ~heads_item & ~tails_item
        ie_heads = np.unique(t[ie, 0]).size
        ii_heads = np.unique(t[ii, 0]).size
        relations.append(RelationShape(
            rel,
            ie_coverage=_r(ie_heads / n_linked),
            ie_per_head=_r(ie.sum() / ie_heads) if ie_heads else 0.0,
            ie_tails=_r(np.unique(t[ie, 2]).size / n_items),
            ii_coverage=_r(ii_heads / n_linked),
            ii_per_head=_r(ii.sum() / ii_heads) if ii_heads else 0.0,
            ei_triples=_r(ei.sum() / n_items),
            ei_heads=_r(np.unique(t[ei, 0]).size / n_items),
            ee_triples=_r(ee.sum() / n_items),
            ee_entities=_r(np.unique(t[ee][:, [0, 2]]).size / n_items),
        ))  # fmt: skip
    return Shape(name or dataset.name, _r(n_linked / n_items), tuple(relations))


# measure_shape(model.data.load("ml-100k")), pinned so that synth needs no download
# (tests/test_synth.py checks it against the real data set).
_RS = RelationShape
ML_100K = Shape("ml-100k", 0.9501, (
    _RS("film.producer.film", inverse_of="film.film.produced_by"),
    _RS("film.film.actor", ie_coverage=0.9793, ie_per_head=25.6562, ie_tails=16.2081),
    _RS("film.film_genre.films_in_this_genre", inverse_of="film.film.genre"),
    _RS("film.film.genre", ie_coverage=0.9987, ie_per_head=4.5013, ie_tails=0.1344),
    _RS("film.writer.film", inverse_of="film.film.written_by"),
    _RS("film.film.award_nomination", ie_coverage=0.5626, ie_per_head=7.0601, ie_tails=0.3734),
    _RS("film.film.directed_by", ie_coverage=0.995, ie_per_head=1.0862, ie_tails=0.6724),
    _RS("film.cinematographer.film", inverse_of="film.film.cinematography"),
    _RS("film.film.produced_by", ie_coverage=0.8554, ie_per_head=1.9129, ie_tails=0.9578),
    _RS("film.film.subjects", ie_coverage=0.2841, ie_per_head=1.5617, ie_tails=0.1962,
        ei_triples=0.0036, ei_heads=0.0036),
    _RS("film.content_rating.film", inverse_of="film.film.rating"),
    _RS("film.production_company.films", inverse_of="film.film.production_companies"),
    _RS("film.film.written_by", ie_coverage=0.836, ie_per_head=1.7822, ie_tails=1.0458),
    _RS("film.film.country", ie_coverage=0.9969, ie_per_head=1.3886, ie_tails=0.0404),
    _RS("film.film.language", ie_coverage=0.9937, ie_per_head=1.4049, ie_tails=0.0547),
    _RS("film.film_subject.films", inverse_of="film.film.subjects"),
    _RS("film.film.rating", ie_coverage=0.7722, ie_per_head=1.09, ie_tails=0.0131),
    _RS("film.film.production_companies", ie_coverage=0.5507, ie_per_head=1.5864, ie_tails=0.1492),
    _RS("film.film.award_won", ie_coverage=0.3573, ie_per_head=4.38, ie_tails=0.3722),
    _RS("film.director.film", inverse_of="film.film.directed_by"),
    _RS("film.film.cinematography", ie_coverage=0.8179, ie_per_head=1.0834, ie_tails=0.3924),
    _RS("film.film.sequel", ie_coverage=0.1164, ie_per_head=1.0054, ie_tails=0.1112,
        ii_coverage=0.0357, ii_per_head=1.0, ei_triples=0.0404, ei_heads=0.0398),
    _RS("film.film.prequel", inverse_of="film.film.sequel"),
    _RS("film.actor.film", ie_coverage=0.0006, ie_per_head=1.0, ie_tails=0.0006, ei_triples=0.003,
        ei_heads=0.003),
))  # fmt: skip
del _RS

_SHAPES = {"ml-100k": ML_100K}


def _shape(shape_of: str | Path | Shape) -> Shape:
    if isinstance(shape_of, Shape):
        return shape_of
    if isinstance(shape_of, str) and shape_of in _SHAPES:
        return _SHAPES[shape_of]
    from model.data import load

    return measure_shape(load(shape_of))


# --------------------------------------------------------------------------- generation


def _count(x: float) -> int:
    """round(x), but at least 1 when x > 0: every block the shape has shows up at any size."""
    return 0 if x <= 0 else max(1, round(x))


def _zipf(rng: np.random.Generator, n: int, size: int, exponent: float = 1.0) -> np.ndarray:
    """``n`` draws from 0..size-1 with P(k) proportional to (k + 1) ** -exponent."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    cdf = np.cumsum(np.arange(1, size + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), size - 1)


def _pool_draw(rng: np.random.Generator, n: int, pool: int) -> np.ndarray:
    """``n`` pool indices in random order: each of ``min(pool, n)`` entities at least once,
    the rest Zipf-distributed over the pool."""
    pool = min(pool, n)
    return rng.permutation(np.concatenate([np.arange(pool), _zipf(rng, n - pool, pool)]))


def _heads(rng: np.random.Generator, n_linked: int, coverage: float, per_head: float) -> np.ndarray:
    """Linked-item positions heading a block, each repeated 1 + Poisson(per_head - 1) times."""
    k = min(_count(coverage * n_linked), n_linked)
    chosen = np.sort(rng.choice(n_linked, size=k, replace=False))
    return np.repeat(chosen, 1 + rng.poisson(max(per_head - 1.0, 0.0), size=k))


def _unique_pairs(heads: np.ndarray, tails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop duplicate (head, tail) pairs and self-loops; sorted by head, then tail."""
    keep = heads != tails
    keys = np.unique((heads[keep].astype(np.int64) << 32) | tails[keep].astype(np.int64))
    return keys >> 32, keys & 0xFFFFFFFF


class _Entities:
    """Allocates entity ids: 0..n_linked-1 are the linked items' entities, pools follow."""

    def __init__(self, n_linked: int) -> None:
        self.next = n_linked

    def pool(self, size: int) -> int:
        start, self.next = self.next, self.next + size
        return start


def _relation_triples(rng: np.random.Generator, rel: RelationShape, n_items: int,
                      n_linked: int, entities: _Entities) -> tuple[np.ndarray, np.ndarray]:
    hs, ts = [], []
    if rel.ie_coverage > 0:
        h = _heads(rng, n_linked, rel.ie_coverage, rel.ie_per_head)
        pool = min(_count(rel.ie_tails * n_items), h.size)
        hs.append(h)
        ts.append(entities.pool(pool) + _pool_draw(rng, h.size, pool))
    if rel.ii_coverage > 0 and n_linked > 1:
        h = _heads(rng, n_linked, rel.ii_coverage, rel.ii_per_head)
        t = rng.integers(0, n_linked - 1, size=h.size)
        hs.append(h)
        ts.append(t + (t >= h))  # any linked item but the head itself
    n = _count(rel.ei_triples * n_items)
    if n:
        pool = min(_count(rel.ei_heads * n_items), n)
        hs.append(entities.pool(pool) + _pool_draw(rng, n, pool))
        ts.append(rng.integers(0, n_linked, size=n))
    n = _count(rel.ee_triples * n_items)
    if n:
        pool = max(2, _count(rel.ee_entities * n_items))
        start = entities.pool(pool)
        hs.append(start + rng.integers(0, pool, size=n))
        ts.append(start + rng.integers(0, pool, size=n))
    if not hs:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return _unique_pairs(np.concatenate(hs), np.concatenate(ts))


def _events(rng: np.random.Generator, users: int, items: int, events: int) -> Iterator[str]:
    """The .inter body in chunks of text: every user and item at least once, in time order."""
    u = np.concatenate([np.arange(1, users + 1), rng.integers(1, users + 1, size=events - users)])
    u = rng.permutation(u)
    ranking = rng.permutation(items) + 1  # rank k (most popular first) -> item id
    i = np.concatenate([np.arange(1, items + 1),
                        ranking[_zipf(rng, events - items, items, ITEM_ZIPF_EXPONENT)]])
    i = rng.permutation(i)
    rating = rng.choice(np.arange(1, 6), size=events, p=_RATING_WEIGHTS)
    ms = np.arange(events, dtype=np.int64) * 1000 + rng.integers(0, 1000, size=events)
    for lo in range(0, events, _CHUNK):
        s = slice(lo, lo + _CHUNK)
        sec, frac = np.divmod(ms[s], 1000)
        yield "".join(
            f"{a}\t{b}\t{c}\t{START_TS + d}.{e:03d}\n"
            for a, b, c, d, e in zip(
                u[s].tolist(), i[s].tolist(), rating[s].tolist(), sec.tolist(), frac.tolist(),
                strict=True,
            )
        )


def _kg_rows(relations: list[tuple[str, np.ndarray, np.ndarray]]) -> Iterator[str]:
    for name, h, t in relations:
        for lo in range(0, h.size, _CHUNK):
            yield "".join(
                f"m.{a}\t{name}\tm.{b}\n"
                for a, b in zip(h[lo : lo + _CHUNK].tolist(), t[lo : lo + _CHUNK].tolist(),
                                strict=True)
            )


def _write(path: Path, header: str, chunks: Iterator[str]) -> int:
    """Write ``header`` and the chunks to ``path`` through a temporary file; returns bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n", buffering=1 << 22) as f:
        f.write(header + "\n")
        f.writelines(chunks)
    os.replace(tmp, path)
    return path.stat().st_size


@dataclass(frozen=True)
class SynthResult:
    """Where :func:`synth_with_stats` wrote the data set, and what it holds."""

    path: Path
    users: int
    items: int
    events: int
    relations: int
    triples: int
    entities: int
    linked_items: int
    seed: int
    shape: str

    def as_dict(self) -> dict:
        """JSON-ready fields (the path as a string)."""
        return {**self.__dict__, "path": str(self.path)}


def _check_folder(folder: Path, name: str) -> None:
    for suffix in (".inter", ".kg", ".link"):
        others = sorted(p.name for p in folder.glob(f"*{suffix}") if p.stem != name)
        if others:
            raise DataError(
                f"{folder} already holds {', '.join(others)}: the loader needs one data set per "
                f"folder, so write to an empty folder or remove those files"
            )


def synth_with_stats(
    out_dir: str | Path,
    users: int = 1_000_000,
    items: int = 100_000,
    events: int | None = None,
    seed: int = 7,
    shape_of: str | Path | Shape = "ml-100k",
) -> SynthResult:
    """Write ``NAME.inter``, ``NAME.kg`` and ``NAME.link`` into ``out_dir`` (NAME is its folder
    name) and return what was written; see the module docstring for the model."""
    if users < 1 or items < 1:
        raise DataError(f"need at least one user and one item (got users={users}, items={items})")
    events = max(users, items) if events is None else events
    if events < max(users, items):
        raise DataError(
            f"events={events} is fewer than max(users, items)={max(users, items)}: every user "
            "and every item gets at least one event, so ask for more events"
        )
    shape = _shape(shape_of)
    folder = Path(out_dir).expanduser()
    name = folder.resolve().name
    folder.mkdir(parents=True, exist_ok=True)
    _check_folder(folder, name)
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()

    n_linked = min(round(shape.linked_fraction * items), items)
    linked = np.sort(rng.choice(items, size=n_linked, replace=False)) + 1  # item ids
    entities = _Entities(n_linked)
    generated: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rel in shape.relations:
        if rel.inverse_of is None:
            generated[rel.name] = _relation_triples(rng, rel, items, n_linked, entities)
    kg = []
    for rel in shape.relations:
        if rel.inverse_of is None:
            h, t = generated[rel.name]
        else:
            t, h = generated[rel.inverse_of]
            h, t = _unique_pairs(h, t)
        if h.size:
            kg.append((rel.name, h, t))
    triples = sum(h.size for _, h, _ in kg)
    used = np.zeros(entities.next, dtype=bool)
    used[:n_linked] = True
    for _, h, t in kg:
        used[h] = used[t] = True
    _log(f"knowledge graph: {len(kg)} relations, {triples} triples "
         f"({time.monotonic() - t0:.1f} s)")

    sizes = {}
    sizes["inter"] = _write(
        folder / f"{name}.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        _events(rng, users, items, events),
    )
    _log(f"{events} events written ({time.monotonic() - t0:.1f} s)")
    sizes["kg"] = _write(folder / f"{name}.kg", "head_id:token\trelation_id:token\ttail_id:token",
                         _kg_rows(kg))
    sizes["link"] = _write(
        folder / f"{name}.link", "item_id:token\tentity_id:token",
        iter(["".join(f"{item}\tm.{j}\n" for j, item in enumerate(linked.tolist()))]),
    )
    mib = sum(sizes.values()) / (1 << 20)
    _log(f"wrote {folder} ({mib:.1f} MiB) in {time.monotonic() - t0:.1f} s")
    return SynthResult(
        path=folder, users=users, items=items, events=events, relations=len(kg), triples=triples,
        entities=int(used.sum()), linked_items=n_linked, seed=seed, shape=shape.name,
    )


def synth(
    out_dir: str | Path,
    users: int = 1_000_000,
    items: int = 100_000,
    events: int | None = None,
    seed: int = 7,
    shape_of: str | Path | Shape = "ml-100k",
) -> Path:
    """Write a synthetic data set into ``out_dir`` and return the folder (see the module
    docstring; :func:`synth_with_stats` also returns the counts)."""
    return synth_with_stats(out_dir, users, items, events, seed, shape_of).path
