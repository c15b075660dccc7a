"""Tests for model.synth and `ksr data synth`: synthetic data sets with ml-100k's KG shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from model import data
from model.data import DataError
from model.knowledge import relation_coverage
from model.synth import ML_100K, START_TS, measure_shape, synth, synth_with_stats

USERS, ITEMS = 2000, 500
HEADERS = {
    "inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "kg": "head_id:token\trelation_id:token\ttail_id:token",
    "link": "item_id:token\tentity_id:token",
}


@pytest.fixture(scope="module")
def ml100k() -> data.Dataset:
    return data.load("ml-100k")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth(tmp_path_factory.mktemp("synth") / "small", users=USERS, items=ITEMS)


def coverage(dataset: data.Dataset) -> dict[str, float]:
    """Per relation, the fraction of linked items that head a triple of it (what the model
    ranks relations by)."""
    cov = relation_coverage(dataset) / dataset.linked_items()
    return dict(zip(dataset.relation_tokens, cov.tolist(), strict=True))


def test_files_and_headers(small: Path) -> None:
    assert sorted(p.name for p in small.iterdir()) == ["small.inter", "small.kg", "small.link"]
    for suffix, header in HEADERS.items():
        with open(small / f"small.{suffix}", encoding="utf-8") as f:
            assert f.readline().rstrip("\n") == header


def test_loads_with_requested_counts(small: Path) -> None:
    d = data.load(small)
    assert d.name == "small"
    # Every requested user and item has at least one event; events default to max(users, items).
    assert (d.n_users, d.n_items - 1, d.n_events) == (USERS, ITEMS, USERS)
    assert sorted(d.user_tokens, key=int) == [str(u) for u in range(1, USERS + 1)]
    assert sorted(d.item_tokens[1:], key=int) == [str(i) for i in range(1, ITEMS + 1)]


def test_events_in_time_order_with_popular_items(small: Path) -> None:
    rows = [ln.split("\t") for ln in (small / "small.inter").read_text().splitlines()[1:]]
    ts = np.array([float(r[3]) for r in rows])
    assert ts[0] >= START_TS and np.all(np.diff(ts) > 0)
    assert 0.5 < np.diff(ts).mean() < 1.5  # about one event per second
    assert {r[2] for r in rows} == {"1", "2", "3", "4", "5"}
    # Zipf popularity: the top 10% of items take far more than 10% of the events.
    counts = np.sort(np.bincount(data.load(small).items)[1:])[::-1]
    assert counts[: ITEMS // 10].sum() > 0.3 * counts.sum()


def test_pinned_shape_is_ml100k(ml100k: data.Dataset) -> None:
    assert measure_shape(ml100k) == ML_100K


def test_kg_has_ml100k_shape(small: Path, ml100k: data.Dataset) -> None:
    d = data.load(small)
    assert d.relation_tokens == ml100k.relation_tokens
    assert d.linked_items() / ITEMS == pytest.approx(ml100k.linked_items() / (ml100k.n_items - 1),
                                                     abs=0.01)
    ours, theirs = coverage(d), coverage(ml100k)
    for rel, value in theirs.items():
        assert ours[rel] == pytest.approx(value, abs=0.05), rel
    # Mirror relations come out as exact flips, the rest with ml-100k's tails per head.
    shape = measure_shape(d)
    for got, want in zip(shape.relations, ML_100K.relations, strict=True):
        assert got.inverse_of == want.inverse_of, got.name
        if want.ie_per_head >= 1.5 and want.ie_coverage > 0.3:
            assert got.ie_per_head == pytest.approx(want.ie_per_head, rel=0.2), got.name
    # Scaled size: triples per item within 15% of ml-100k's.
    per_item = len(ml100k.triples) / (ml100k.n_items - 1)
    assert len(d.triples) / ITEMS == pytest.approx(per_item, rel=0.15)


def test_same_seed_same_bytes(tmp_path: Path, small: Path) -> None:
    again = synth(tmp_path / "again", users=USERS, items=ITEMS)
    other = synth(tmp_path / "other", users=USERS, items=ITEMS, seed=8)
    for suffix in HEADERS:
        first = (small / f"small.{suffix}").read_bytes()
        assert (again / f"again.{suffix}").read_bytes() == first
        assert (other / f"other.{suffix}").read_bytes() != first, suffix


def test_more_events_than_users(tmp_path: Path) -> None:
    result = synth_with_stats(tmp_path / "many", users=50, items=30, events=400, seed=1)
    d = data.load(result.path)
    assert (d.n_users, d.n_items - 1, d.n_events) == (50, 30, 400)
    assert (result.triples, result.linked_items) == (len(d.triples), d.linked_items())
    assert result.entities == d.n_entities


def test_rejects_too_few_events_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than max"):
        synth(tmp_path / "few", users=100, items=50, events=99)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(DataError, match="already holds other.inter"):
        synth(busy, users=10, items=10)


def test_cli_json(tmp_path: Path) -> None:
    ksr = Path(sys.executable).parent / "ksr"
    out = tmp_path / "cli"
    result = subprocess.run(
        [str(ksr), "data", "synth", "--out", str(out), "--users", "1000", "--items", "200",
         "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    d = data.load(out)
    assert report["path"] == str(out)
    assert (report["users"], report["items"], report["events"]) == (1000, 200, 1000)
    assert (report["users"], report["items"], report["events"]) == (
        d.n_users, d.n_items - 1, d.n_events)
    assert report["relations"] == d.n_relations == len(ML_100K.relations)
    assert report["triples"] == len(d.triples) and report["linked_items"] == d.linked_items()
    assert "synth:" in result.stderr  # progress goes to stderr, stdout holds only the JSON

    result = subprocess.run(
        [str(ksr), "data", "synth", "--out", str(out), "--users", "10", "--items", "20",
         "--events", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "fewer than max" in result.stderr and not result.stdout
