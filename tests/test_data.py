"""Tests for model.data: RecBole atomic-file parsing, error messages and the ml-100k fetch.

Corrupted cache policy (tested below): `fetch` verifies every cached file against the pinned
SHA-256 table on each call; a damaged or incomplete cache is reported on stderr and replaced by
a fresh, verified download. A download whose digests do not match raises DataError and leaves
no cache folder behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from model import data
from model.data import DataError

INTER = """\
user_id:token\titem_id:token\trating:float\ttimestamp:float
u1\ti10\t4\t300
u2\ti20\t3\t100
u1\ti30\t5\t100
u3\ti10\t1\t200
u2\ti10\t2\t100
u3\ti40\t2\t300
"""
KG = """\
head_id:token\trelation_id:token\ttail_id:token
e10\tdirected_by\tp1
e20\tdirected_by\tp1
e10\tgenre\tg1
p1\tborn_in\tc1
"""
LINK = """\
item_id:token\tentity_id:token
i10\te10
i20\te20
i40\te40
"""


def write_set(folder: Path, name: str = "toy", **files: str | bytes) -> Path:
    """Write NAME.<suffix> for each keyword (inter=..., kg=..., link=...) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, content in files.items():
        path = folder / f"{name}.{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return folder


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_set(tmp_path / "toy", inter=INTER, kg=KG, link=LINK)


def error_of(data_arg: str | Path) -> str:
    with pytest.raises(DataError) as info:
        data.load(data_arg)
    return str(info.value)


# ------------------------------------------------------------------------- parsing


def test_events_sorted_stably_by_time(toy: Path) -> None:
    d = data.load(toy)
    # Ties at t=100 and t=300 keep file order: (u2,i20), (u1,i30), (u2,i10) / (u1,i10), (u3,i40).
    assert d.timestamps.tolist() == [100, 100, 100, 200, 300, 300]
    assert d.timestamps.dtype == np.float64
    assert [d.user_tokens[u] for u in d.users] == ["u2", "u1", "u2", "u3", "u1", "u3"]
    assert [d.item_tokens[i] for i in d.items] == ["i20", "i30", "i10", "i10", "i10", "i40"]
    assert d.users.dtype == np.int64 and d.items.dtype == np.int64
    # Indices follow first appearance in time order.
    assert d.user_tokens == ["u2", "u1", "u3"]
    assert d.item_tokens == ["[PAD]", "i20", "i30", "i10", "i40"]
    assert (d.n_users, d.n_items, d.n_events) == (3, 5, 6)
    assert d.name == "toy" and d.path == toy.resolve()


def test_stats_count_ties_between_a_users_consecutive_events(toy: Path) -> None:
    # u1: 100 -> 300 (gap 200); u2: 100 -> 100 (a tie); u3: 200 -> 300 (gap 100).
    stats = data.load(toy).stats()
    assert {k: stats[k] for k in ("users", "items", "events", "triples", "linked_items")} == {
        "users": 3, "items": 4, "events": 6, "triples": 4, "linked_items": 3}
    assert stats["consecutive_pairs"] == 3
    assert stats["same_timestamp_share"] == stats["within_60s_share"] == round(1 / 3, 4)
    assert stats["median_gap_s"] == 100.0


def test_user_timestamps_line_up_with_the_sequences(toy: Path) -> None:
    d = data.load(toy)
    by_user = {d.user_tokens[u]: (s.tolist(), t.tolist())
               for u, (s, t) in enumerate(zip(d.user_sequences(), d.user_timestamps()))}
    assert by_user["u1"] == ([d.item_index["i30"], d.item_index["i10"]], [100.0, 300.0])
    assert by_user["u2"] == ([d.item_index["i20"], d.item_index["i10"]], [100.0, 100.0])  # a tie, file order


def test_user_sequences_in_time_order(toy: Path) -> None:
    d = data.load(toy)
    seqs = {
        d.user_tokens[u]: [d.item_tokens[i] for i in s] for u, s in enumerate(d.user_sequences())
    }
    assert seqs == {"u1": ["i30", "i10"], "u2": ["i20", "i10"], "u3": ["i10", "i40"]}
    assert sum(len(s) for s in d.user_sequences()) == d.n_events


def test_item_zero_is_padding(toy: Path) -> None:
    d = data.load(toy)
    assert d.item_tokens[0] == data.PAD_TOKEN == "[PAD]"
    assert d.items.min() >= 1
    assert "[PAD]" not in d.item_index
    assert d.item_index == {"i20": 1, "i30": 2, "i10": 3, "i40": 4}
    assert d.user_index == {"u2": 0, "u1": 1, "u3": 2}
    assert d.item_entity.shape == (d.n_items,) and d.item_entity[0] == -1


def test_items_linked_to_one_entity_each_get_its_relations(tmp_path: Path) -> None:
    from model.knowledge import item_relation_matrix, relation_coverage

    # i30 is linked to e10 as well as i10: both head e10's triples (directed_by, genre).
    folder = write_set(tmp_path / "shared", inter=INTER, kg=KG, link=LINK + "i30\te10\n")
    d = data.load(folder)
    matrix = item_relation_matrix(d)
    relations = {r: d.relation_tokens.index(r) for r in ("directed_by", "genre", "born_in")}
    for item in ("i10", "i30"):
        row = matrix[d.item_index[item]]
        assert row[relations["directed_by"]] and row[relations["genre"]] and not row[relations["born_in"]]
    assert matrix[d.item_index["i20"]].tolist() == [True, False, False]
    assert relation_coverage(d).tolist() == [3, 2, 0]  # directed_by: i10, i20, i30; genre: i10, i30


def test_knowledge_graph_and_links(toy: Path) -> None:
    d = data.load(toy)
    assert d.relation_tokens == ["directed_by", "genre", "born_in"]
    # Entities: .kg heads/tails in file order, then .link entities not in the graph (e40).
    assert d.entity_tokens == ["e10", "p1", "e20", "g1", "c1", "e40"]
    assert d.triples.dtype == np.int64 and d.triples.shape == (4, 3)
    named = [
        (d.entity_tokens[h], d.relation_tokens[r], d.entity_tokens[t]) for h, r, t in d.triples
    ]
    assert named == [
        ("e10", "directed_by", "p1"),
        ("e20", "directed_by", "p1"),
        ("e10", "genre", "g1"),
        ("p1", "born_in", "c1"),
    ]
    linked = {d.item_tokens[i]: d.item_entity[i] for i in range(1, d.n_items)}
    assert linked["i30"] == -1  # not in .link
    assert d.entity_tokens[linked["i10"]] == "e10"
    assert d.entity_tokens[linked["i40"]] == "e40"
    assert d.linked_items() == 3
    assert (d.n_entities, d.n_relations) == (6, 3)


def test_inter_only_folder(tmp_path: Path) -> None:
    d = data.load(write_set(tmp_path / "x", name="solo", inter=INTER))
    assert d.name == "solo"
    assert d.triples.shape == (0, 3) and d.entity_tokens == [] and d.relation_tokens == []
    assert d.linked_items() == 0 and (d.item_entity == -1).all()


def test_inter_without_rating_crlf_and_blank_lines(tmp_path: Path) -> None:
    inter = "item_id:token\tuser_id:token\ttimestamp:float\r\na\tu\t2\r\n\r\nb\tu\t1\r\n\r\n"
    d = data.load(write_set(tmp_path / "x", inter=inter))
    assert [d.item_tokens[i] for i in d.items] == ["b", "a"]
    bad = "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\n\nu\tb\tsoon\n"
    msg = error_of(write_set(tmp_path / "y", inter=bad))
    assert "line 4" in msg and "'soon'" in msg


def test_dataset_is_frozen_and_read_only(toy: Path) -> None:
    d = data.load(toy)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.name = "other"  # type: ignore[misc]
    for arr in (d.users, d.items, d.timestamps, d.triples, d.item_entity, d.user_sequences()[0]):
        with pytest.raises(ValueError):
            arr[0] = 0


def test_fingerprint_tracks_content(toy: Path, tmp_path: Path) -> None:
    fp = data.load(toy).fingerprint
    assert len(fp) == 64 and fp == data.load(toy).fingerprint
    copy = write_set(tmp_path / "copy", inter=INTER, kg=KG, link=LINK)
    assert data.load(copy).fingerprint == fp  # the folder's location does not matter
    (copy / "toy.kg").write_text(KG + "e20\tgenre\tg1\n")
    assert data.load(copy).fingerprint != fp


# ------------------------------------------------------------------------- errors


def test_resolve_unknown(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope")
    assert "no such data set or folder" in msg and "ml-100k" in msg
    assert "no such data set or folder" in error_of("ml-1m")
    with pytest.raises(DataError, match="only named data set is ml-100k"):
        data.fetch("ml-1m")


def test_folder_needs_exactly_one_inter(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = error_of(empty)
    assert "exactly one *.inter" in msg and "found none" in msg
    two = write_set(tmp_path / "two", name="a", inter=INTER)
    write_set(two, name="b", inter=INTER)
    assert "found a.inter, b.inter" in error_of(two)


def test_kg_must_match_inter_name(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "x", inter=INTER)
    write_set(folder, name="other", kg=KG)
    msg = error_of(folder)
    assert "other.kg" in msg and "toy.kg" in msg


@pytest.mark.parametrize(
    ("suffix", "header", "missing", "typ"),
    [
        ("inter", "user_id:token\titem_id:token\trating:float", "timestamp", "float"),
        ("inter", "item_id:token\ttimestamp:float", "user_id", "token"),
        ("inter", "user_id:token\ttimestamp:float", "item_id", "token"),
        ("kg", "relation_id:token\ttail_id:token", "head_id", "token"),
        ("kg", "head_id:token\ttail_id:token", "relation_id", "token"),
        ("kg", "head_id:token\trelation_id:token", "tail_id", "token"),
        ("link", "entity_id:token", "item_id", "token"),
        ("link", "item_id:token", "entity_id", "token"),
    ],
)
def test_missing_column(tmp_path: Path, suffix: str, header: str, missing: str, typ: str) -> None:
    files = {"inter": INTER, "kg": KG, "link": LINK}
    width = header.count("\t") + 1
    files[suffix] = header + "\n" + "\t".join(["1"] * width) + "\n"
    msg = error_of(write_set(tmp_path / "x", **files))
    assert f"toy.{suffix} has no {missing} column" in msg
    assert f"add a `{missing}:{typ}` column" in msg
    assert "columns: " + ", ".join(h.split(":")[0] for h in header.split("\t")) in msg


@pytest.mark.parametrize("suffix", ["inter", "kg", "link"])
def test_empty_files(tmp_path: Path, suffix: str) -> None:
    files: dict[str, str | bytes] = {"inter": INTER, "kg": KG, "link": LINK}
    files[suffix] = b""
    msg = error_of(write_set(tmp_path / "zero", **files))
    assert f"toy.{suffix} is empty (0 bytes)" in msg
    files[suffix] = {"inter": INTER, "kg": KG, "link": LINK}[suffix].splitlines()[0] + "\n\n"
    msg = error_of(write_set(tmp_path / "header", **files))
    assert f"toy.{suffix} has a header but no rows" in msg


@pytest.mark.parametrize(
    ("value", "expect"),
    [("noon", "is not a number"), ("nan", "is not finite"), ("-inf", "is not finite")],
)
def test_bad_timestamp_names_the_line(tmp_path: Path, value: str, expect: str) -> None:
    inter = INTER.replace("u3\ti10\t1\t200", f"u3\ti10\t1\t{value}")
    msg = error_of(write_set(tmp_path / "x", inter=inter))
    assert f"toy.inter line 5: timestamp '{value}' {expect}" in msg


def test_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    # One short and one long row would balance out in a whole-file count; each row is checked.
    inter = INTER.replace("u2\ti20\t3\t100", "u2\ti20\t100").replace(
        "u1\ti30\t5\t100", "u1\ti30\t5\t100\tx"
    )
    msg = error_of(write_set(tmp_path / "x", inter=inter))
    assert "toy.inter line 3 has 3 tab-separated fields, the header has 4" in msg


def test_empty_token(tmp_path: Path) -> None:
    msg = error_of(write_set(tmp_path / "x", inter=INTER, kg=KG.replace("e20\t", "\t")))
    assert "toy.kg line 3 has an empty head_id" in msg


def test_link_to_item_without_events(tmp_path: Path) -> None:
    msg = error_of(write_set(tmp_path / "x", inter=INTER, link=LINK + "i99\te99\n"))
    assert "toy.link line 5: item_id 'i99' appears nowhere in toy.inter" in msg


def test_item_linked_twice(tmp_path: Path) -> None:
    msg = error_of(write_set(tmp_path / "x", inter=INTER, link=LINK + "i10\te99\n"))
    assert "second entity 'e99'" in msg and "line 5" in msg
    # Repeating the same link is harmless.
    assert data.load(write_set(tmp_path / "y", inter=INTER, link=LINK + "i10\te10\n"))


def test_pad_token_is_reserved(tmp_path: Path) -> None:
    msg = error_of(write_set(tmp_path / "x", inter=INTER.replace("i40", "[PAD]")))
    assert "reserved for padding" in msg and "line 7" in msg


# ------------------------------------------------------------------------- fetch (offline)

FAKE_FILES = {
    "ml-100k.inter": INTER.encode(),
    "ml-100k.kg": KG.encode(),
    "ml-100k.link": LINK.encode(),
}


@pytest.fixture
def fake_pypi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    """Point the cache at tmp_path and make `pip download` write a small fake wheel."""
    monkeypatch.setenv("KSR_DATA_DIR", str(tmp_path / "cache"))
    pinned = {n: hashlib.sha256(b).hexdigest() for n, b in FAKE_FILES.items()}
    monkeypatch.setitem(data._PINNED, "ml-100k", pinned)
    state: dict[str, object] = {"calls": 0, "files": dict(FAKE_FILES)}

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "recbole==1.2.1" in cmd
        state["calls"] = int(state["calls"]) + 1  # type: ignore[call-overload]
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "recbole-1.2.1-py3-none-any.whl", "w") as zf:
            zf.writestr("recbole/__init__.py", "")
            for fname, payload in state["files"].items():  # type: ignore[attr-defined]
                zf.writestr(f"recbole/dataset_example/ml-100k/{fname}", payload)
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    return state


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KSR_DATA_DIR", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("KSR_DATA_DIR")
    assert data.cache_dir() == Path.home() / ".cache" / "ksr-stream" / "data"


def test_fetch_downloads_once_and_prints_terms(
    fake_pypi: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = data.fetch()
    assert path == tmp_path / "cache" / "ml-100k"
    assert sorted(p.name for p in path.iterdir()) == sorted(FAKE_FILES)
    err = capsys.readouterr()
    assert err.out == ""  # stdout stays clean for --json
    assert "Harper" in err.err and "KB4Rec" in err.err and "non-commercial" in err.err
    assert data.fetch() == path and fake_pypi["calls"] == 1
    assert capsys.readouterr().err == ""  # a cache hit prints nothing
    assert data.load("ml-100k").n_events == 6
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_corrupted_cache_is_refetched(
    fake_pypi: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    path = data.fetch()
    (path / "ml-100k.kg").write_text("tampered\n")
    (path / "ml-100k.link").unlink()
    capsys.readouterr()
    assert data.fetch() == path and fake_pypi["calls"] == 2
    err = capsys.readouterr().err
    assert (
        "is damaged" in err and "ml-100k.kg has SHA-256" in err and "ml-100k.link is missing" in err
    )
    assert (path / "ml-100k.kg").read_bytes() == FAKE_FILES["ml-100k.kg"]
    assert (path / "ml-100k.link").read_bytes() == FAKE_FILES["ml-100k.link"]


def test_download_with_wrong_digest_is_rejected(fake_pypi: dict[str, object]) -> None:
    fake_pypi["files"] = {**FAKE_FILES, "ml-100k.kg": KG.encode() + b"x\ty\tz\n"}
    with pytest.raises(DataError) as info:
        data.fetch()
    msg = str(info.value)
    expected = hashlib.sha256(KG.encode()).hexdigest()
    actual = hashlib.sha256(KG.encode() + b"x\ty\tz\n").hexdigest()
    assert "ml-100k.kg" in msg and f"SHA-256 {actual}, expected {expected}" in msg
    assert not (data.cache_dir() / "ml-100k").exists()
    assert [p.name for p in data.cache_dir().iterdir()] == []  # temp folder cleaned up


def test_download_missing_member_is_rejected(fake_pypi: dict[str, object]) -> None:
    fake_pypi["files"] = {k: v for k, v in FAKE_FILES.items() if k != "ml-100k.link"}
    with pytest.raises(DataError, match="lacks recbole/dataset_example/ml-100k/ml-100k.link"):
        data.fetch()


def test_pip_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KSR_DATA_DIR", str(tmp_path))

    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution\n")

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(DataError) as info:
        data.fetch()
    msg = str(info.value)
    assert "exit code 1" in msg and "No matching distribution" in msg and "by hand" in msg
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- the real data


@pytest.mark.slow
def test_real_ml100k(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KSR_DATA_DIR", str(tmp_path))
    path = data.fetch("ml-100k")
    assert path == tmp_path / "ml-100k"

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second fetch must use the cache")

    monkeypatch.setattr(data.subprocess, "run", no_download)
    assert data.fetch("ml-100k") == path

    t0 = time.perf_counter()
    d = data.load("ml-100k")
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert (d.n_users, d.n_items, d.n_events) == (943, 1683, 100_000)
    assert d.linked_items() == 1598
    assert d.triples.shape == (91_631, 3)
    assert (d.n_entities, d.n_relations) == (34_628, 24)
    assert np.all(np.diff(d.timestamps) >= 0)
    assert d.fingerprint == data.load(path).fingerprint
