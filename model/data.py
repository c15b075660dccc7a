"""Data sets in RecBole's atomic-file format, and the pinned MovieLens-100K + Freebase set.

A data set is a folder holding exactly one ``NAME.inter`` (events) and optionally ``NAME.kg``
(knowledge-graph triples) and ``NAME.link`` (item -> KG entity). Files are tab-separated with a
``name:type`` header. ``NAME.item``/``NAME.user`` may be present and are ignored.

``ml-100k`` is never stored in the repository (its terms forbid redistribution): :func:`fetch`
takes it from the ``recbole==1.2.1`` wheel on PyPI at run time, checks every file against
SHA-256 digests pinned below and caches it under :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

__all__ = [
    "PAD_TOKEN",
    "DataError",
    "Dataset",
    "cache_dir",
    "fetch",
    "load",
    "resolve",
]

PAD_TOKEN = "[PAD]"

RECBOLE_REQUIREMENT = "recbole==1.2.1"

# Digests of the files inside recbole-1.2.1-py3-none-any.whl (wheel SHA-256
# 9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407), computed once and pinned so
# that a changed upstream file, a bad mirror or a damaged cache can never silently change results.
_PINNED: dict[str, dict[str, str]] = {
    "ml-100k": {
        "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        "ml-100k.kg": "200a0636fa07c218119a42e5bac7aa3e26e3665a6f919c1b22909bd412b14779",
        "ml-100k.link": "524dca2c3d62619688ab99b3ec53ea2acb9b64d38eafec3e02bdd0dc6bb7d948",
        "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    },
}

_WHEEL_PREFIX = {"ml-100k": "recbole/dataset_example/ml-100k/"}

_TERMS = {
    "ml-100k": """\
ml-100k terms of use (read before using the data):
  MovieLens 100K, GroupLens Research (University of Minnesota): for research use; do not
    redistribute without separate permission. Cite: F. Maxwell Harper and Joseph A. Konstan.
    2015. The MovieLens Datasets: History and Context. ACM TiiS 5(4), Article 19.
  Freebase item links and knowledge graph, KB4Rec: non-commercial research use only. Cite:
    Wayne Xin Zhao, Gaole He, Kunlin Yang, Hongjian Dou, Jin Huang, Siqi Ouyang and Ji-Rong
    Wen. 2019. KB4Rec: A Data Set for Linking Knowledge Bases with Recommender Systems.
    Data Intelligence 1(2), 121-136.
  The files are taken from the recbole==1.2.1 wheel on PyPI and cached outside the repository;
  never commit or publish them.""",
}

# Columns each file must have, with the RecBole type to suggest when one is missing.
_INTER_COLUMNS = {"user_id": "token", "item_id": "token", "timestamp": "float"}
_KG_COLUMNS = {"head_id": "token", "relation_id": "token", "tail_id": "token"}
_LINK_COLUMNS = {"item_id": "token", "entity_id": "token"}


class DataError(ValueError):
    """A data set is missing, unreadable or malformed; the message says what to do about it."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fetching


def cache_dir() -> Path:
    """Folder that holds fetched data sets: ``$KSR_DATA_DIR`` or ``~/.cache/ksr-stream/data``."""
    env = os.environ.get("KSR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ksr-stream" / "data"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problems(folder: Path, pinned: dict[str, str]) -> list[str]:
    """Why ``folder`` is not a valid copy of the pinned files (empty list: it is)."""
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    problems = []
    for fname, expected in sorted(pinned.items()):
        path = folder / fname
        if not path.is_file():
            problems.append(f"{fname} is missing")
            continue
        actual = _sha256_file(path)
        if actual != expected:
            problems.append(f"{fname} has SHA-256 {actual}, expected {expected}")
    return problems


def _download_wheel(dest: Path) -> Path:
    """Download the pinned RecBole wheel into ``dest`` with the venv's own pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", RECBOLE_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    _log(f"downloading the {RECBOLE_REQUIREMENT} wheel from PyPI (about 2 MB) ...")
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
    except OSError as exc:
        raise DataError(
            f"could not run pip ({exc}): is pip installed in {sys.executable}?"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        raise DataError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}\n"
            "Check the network or pip's index settings (PIP_INDEX_URL), or, on a machine "
            f"without network, unpack recbole/dataset_example/ml-100k/* from the "
            f"{RECBOLE_REQUIREMENT} wheel into {cache_dir() / 'ml-100k'} by hand."
        )
    wheels = sorted(dest.glob("recbole-*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise DataError(
            f"pip download of {RECBOLE_REQUIREMENT} left {found} in {dest}, expected one "
            "recbole-*.whl: check pip's index settings (PIP_INDEX_URL, PIP_FIND_LINKS)"
        )
    return wheels[0]


def _extract_verified(wheel: Path, prefix: str, pinned: dict[str, str], dest: Path) -> None:
    """Write the pinned members under ``prefix`` into ``dest``, checking every digest."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{wheel.name} is not a valid wheel ({exc}): delete it and retry") from exc
    with zf:
        members = {
            info.filename[len(prefix):]: info
            for info in zf.infolist()
            if info.filename.startswith(prefix) and not info.is_dir()
        }  # fmt: skip
        missing = sorted(set(pinned) - set(members))
        if missing:
            raise DataError(
                f"{wheel.name} lacks {', '.join(prefix + m for m in missing)}: "
                f"pip did not fetch the expected {RECBOLE_REQUIREMENT} wheel"
            )
        for fname, expected in sorted(pinned.items()):
            payload = zf.read(members[fname])
            actual = hashlib.sha256(payload).hexdigest()
            if actual != expected:
                raise DataError(
                    f"{fname} from {wheel.name} has SHA-256 {actual}, expected {expected}: "
                    "the download is corrupt or the index served a different file; retry, "
                    "and do not use this copy"
                )
            # Only names from the pinned table are written, so archive paths cannot escape.
            (dest / fname).write_bytes(payload)


def _install(tmp: Path, target: Path, pinned: dict[str, str]) -> None:
    """Move the verified folder ``tmp`` to ``target`` with renames, never a partial copy."""
    stale: Path | None = None
    if target.exists() or target.is_symlink():
        stale = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.stale-"))
        os.rmdir(stale)
        os.rename(target, stale)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process may have installed a good copy between our rename and this one.
        if _cache_problems(target, pinned):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def fetch(name: str = "ml-100k") -> Path:
    """Return the folder of the named data set, downloading and verifying it if needed.

    A cached copy is used when every file matches the pinned SHA-256 table. A missing,
    incomplete or corrupted cache is reported on stderr and replaced by a fresh download;
    the new copy is verified before it is renamed into place, so a failed fetch never leaves
    a half-written folder behind.
    """
    if name not in _PINNED:
        raise DataError(f"unknown data set {name!r}: the only named data set is ml-100k")
    pinned = _PINNED[name]
    target = cache_dir() / name
    problems = _cache_problems(target, pinned)
    if not problems:
        return target
    if target.exists():
        _log(f"cached {name} at {target} is damaged ({'; '.join(problems)}); fetching it again")

    _log(_TERMS[name])
    t0 = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract next to the target so the final rename stays on one file system.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.tmp-"))
    try:
        with tempfile.TemporaryDirectory(prefix="ksr-wheel-") as wheel_dir:
            wheel = _download_wheel(Path(wheel_dir))
            _log(f"extracting and verifying {len(pinned)} files from {wheel.name} ...")
            _extract_verified(wheel, _WHEEL_PREFIX[name], pinned, tmp)
        _install(tmp, target, pinned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"{name} cached at {target} ({time.monotonic() - t0:.1f} s)")
    return target


def resolve(data: str | Path) -> Path:
    """Map ``--data`` to a folder: the string ``"ml-100k"`` is fetched, anything else must be
    an existing folder of RecBole atomic files."""
    if isinstance(data, str) and data in _PINNED:
        return fetch(data)
    path = Path(data).expanduser()
    if not path.is_dir():
        raise DataError(
            f"no such data set or folder: {str(data)!r}; use ml-100k or a folder of RecBole "
            "atomic files (NAME.inter, optionally NAME.kg and NAME.link)"
        )
    return path


# --------------------------------------------------------------------------- parsing


@dataclass
class _Table:
    """The columns a caller asked for, as parallel lists of raw strings."""

    name: str
    digest: str
    columns: dict[str, list[str]]
    linenos: list[int] | None  # None: no blank lines, row j is on line j + 2

    def line(self, j: int) -> int:
        """1-based line number of row ``j`` (the header is line 1)."""
        return j + 2 if self.linenos is None else self.linenos[j]


def _read_table(path: Path, required: dict[str, str]) -> _Table:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if not raw.strip():
        raise DataError(
            f"{path.name} is empty ({len(raw)} bytes): it needs a tab-separated `name:type` "
            "header and at least one row; fill it or remove the file"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text ({exc}): re-save it as UTF-8") from exc

    if "\r" in text:
        text = text.replace("\r\n", "\n")
    head, _, body = text.partition("\n")
    names = [h.split(":", 1)[0].strip() for h in head.split("\t")]
    for col, typ in required.items():
        if col not in names:
            raise DataError(
                f"{path.name} has no {col} column (columns: {', '.join(names)}): "
                f"add a `{col}:{typ}` column (tab-separated header of `name:type` fields)"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path.name} has duplicate columns {', '.join(dupes)}: keep one of each")

    body = body.rstrip("\n")
    if not body.strip():
        raise DataError(f"{path.name} has a header but no rows: add rows or remove the file")
    width = len(names)
    linenos: list[int] | None = None
    if "\n\n" not in body and not body.startswith("\n"):
        # Fast path for the usual file without blank lines: count tabs per line with numpy
        # and split the whole body once, instead of one Python split per line.
        buf = np.frombuffer(body.encode(), dtype=np.uint8)
        ends = np.append(np.flatnonzero(buf == 10), buf.size)
        tabs = np.searchsorted(np.flatnonzero(buf == 9), ends)  # tabs before each line end
        per_line = np.diff(tabs, prepend=0) + 1
        bad = np.flatnonzero(per_line != width)
        if bad.size:
            j = int(bad[0])
            raise DataError(
                f"{path.name} line {j + 2} has {per_line[j]} tab-separated fields, the "
                f"header has {width} ({', '.join(names)}): fix the row or the header"
            )
        fields = body.replace("\n", "\t").split("\t")
    else:
        lines = body.split("\n")
        linenos = [i + 2 for i, ln in enumerate(lines) if ln]
        rows = [lines[n - 2].split("\t") for n in linenos]
        for j, r in enumerate(rows):
            if len(r) != width:
                raise DataError(
                    f"{path.name} line {linenos[j]} has {len(r)} tab-separated fields, the "
                    f"header has {width} ({', '.join(names)}): fix the row or the header"
                )
        fields = [f for r in rows for f in r]

    table = _Table(name=path.name, digest=digest, columns={}, linenos=linenos)
    for col in required:
        values = fields[names.index(col) :: width]
        if "" in values:
            j = values.index("")
            raise DataError(f"{path.name} line {table.line(j)} has an empty {col}: fill it in")
        table.columns[col] = values
    return table


def _parse_timestamps(table: _Table) -> np.ndarray:
    values = table.columns["timestamp"]
    try:
        ts = np.array(values, dtype=np.float64)
    except ValueError:
        ts = None
    if ts is None:
        # numpy's parser and float() differ on edge cases (e.g. "1_000"); float() is the judge.
        parsed = []
        for j, v in enumerate(values):
            try:
                parsed.append(float(v))
            except ValueError:
                raise DataError(
                    f"{table.name} line {table.line(j)}: timestamp {v!r} is not a number; "
                    "timestamps must be numeric (e.g. Unix seconds)"
                ) from None
        ts = np.array(parsed, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(ts))
    if bad.size:
        j = int(bad[0])
        raise DataError(
            f"{table.name} line {table.line(j)}: timestamp {values[j]!r} is not finite "
            f"({bad.size} such rows); use real numeric timestamps"
        )
    return ts


def _inter_file(folder: Path) -> Path:
    found = sorted(p for p in folder.glob("*.inter") if p.is_file())
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise DataError(
            f"{folder} must hold exactly one *.inter file (found {listed}): a data set folder "
            "is RecBole atomic files NAME.inter, optionally NAME.kg and NAME.link"
        )
    return found[0]


def _optional_file(folder: Path, suffix: str, stem: str) -> Path | None:
    found = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
    if not found:
        return None
    if len(found) > 1 or found[0].stem != stem:
        listed = ", ".join(p.name for p in found)
        raise DataError(
            f"{folder} has {listed} but the events are {stem}.inter: keep only {stem}{suffix}"
        )
    return found[0]


def _intern(tokens: Sequence[str], index: dict[str, int]) -> np.ndarray:
    """Indices of ``tokens``, adding unseen ones to ``index`` in order of first appearance."""
    # dict.fromkeys keeps first-appearance order and runs in C; much faster than a Python loop.
    for t in dict.fromkeys(tokens):
        if t not in index:
            index[t] = len(index)
    return np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=len(tokens))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An event log with optional knowledge graph, indexed for training and evaluation.

    Events are sorted by timestamp with a stable sort, so ties keep file order; that order is
    the contract for leave-one-out and prequential evaluation. Users are indexed 0..U-1 and
    items 1..I (index 0 is the padding item ``[PAD]``), both in order of first appearance in
    that time order. Arrays are read-only.
    """

    name: str
    path: Path
    fingerprint: str
    user_tokens: list[str]
    item_tokens: list[str]
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    entity_tokens: list[str]
    relation_tokens: list[str]
    triples: np.ndarray
    item_entity: np.ndarray

    @property
    def n_users(self) -> int:
        """Number of users U."""
        return len(self.user_tokens)

    @property
    def n_items(self) -> int:
        """Number of item indices I+1, counting the padding item 0."""
        return len(self.item_tokens)

    @property
    def n_events(self) -> int:
        """Number of events E."""
        return int(self.users.shape[0])

    @property
    def n_entities(self) -> int:
        """Number of KG entities (.kg heads and tails plus .link entities)."""
        return len(self.entity_tokens)

    @property
    def n_relations(self) -> int:
        """Number of KG relations."""
        return len(self.relation_tokens)

    @cached_property
    def user_index(self) -> dict[str, int]:
        """Raw user token -> user index."""
        return {t: i for i, t in enumerate(self.user_tokens)}

    @cached_property
    def item_index(self) -> dict[str, int]:
        """Raw item token -> item index (1..I; the padding item is not a token)."""
        return {t: i for i, t in enumerate(self.item_tokens) if i > 0}

    @cached_property
    def _by_user(self) -> tuple[np.ndarray, np.ndarray]:
        """The event indices grouped by user, each user's in time order (a stable sort by user
        keeps the global time order), and where each user's group starts after the first."""
        order = np.argsort(self.users, kind="stable")
        return order, np.cumsum(np.bincount(self.users, minlength=self.n_users))[:-1]

    def _per_user(self, values: np.ndarray) -> list[np.ndarray]:
        """An event-aligned array split into one array per user, in `_by_user`'s order."""
        order, starts = self._by_user
        return np.split(values[order], starts)

    @cached_property
    def _sequences(self) -> list[np.ndarray]:
        return [_frozen(s) for s in self._per_user(self.items)]

    def user_sequences(self) -> list[np.ndarray]:
        """Per user index, that user's item indices in time order (read-only arrays)."""
        return list(self._sequences)

    def user_timestamps(self) -> list[np.ndarray]:
        """Per user index, the timestamps of `user_sequences()`'s events, in the same order."""
        return self._per_user(self.timestamps)

    def linked_items(self) -> int:
        """Number of items (excluding padding) that have a KG entity."""
        return int(np.count_nonzero(self.item_entity[1:] >= 0))

    def stats(self) -> dict:
        """Counts, and how close in time each user's consecutive events are: the share of
        consecutive pairs (one user's events in time order) with the same timestamp, the share
        within 60 seconds, and the median gap. Ties are ordered by file order, which the
        leave-one-out protocol then treats as the order of consumption."""
        order, _ = self._by_user  # each user's events in time order
        same_user = self.users[order][1:] == self.users[order][:-1]
        gaps = (self.timestamps[order][1:] - self.timestamps[order][:-1])[same_user]
        pairs = int(gaps.size)
        return {
            "name": self.name, "users": self.n_users, "items": self.n_items - 1, "events": self.n_events,
            "entities": self.n_entities, "relations": self.n_relations, "triples": len(self.triples),
            "linked_items": self.linked_items(), "consecutive_pairs": pairs,
            "same_timestamp_share": round(float(np.mean(gaps == 0)), 4) if pairs else None,
            "within_60s_share": round(float(np.mean(gaps <= 60)), 4) if pairs else None,
            "median_gap_s": float(np.median(gaps)) if pairs else None,
        }

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, users={self.n_users}, items={self.n_items - 1}, "
            f"events={self.n_events}, entities={self.n_entities}, "
            f"relations={self.n_relations}, triples={len(self.triples)}, "
            f"linked_items={self.linked_items()}, fingerprint={self.fingerprint[:12]})"
        )


def load(data: str | Path) -> Dataset:
    """Load ``"ml-100k"`` (fetched and cached) or a folder of RecBole atomic files."""
    folder = resolve(data)
    inter_path = _inter_file(folder)
    name = inter_path.stem
    kg_path = _optional_file(folder, ".kg", name)
    link_path = _optional_file(folder, ".link", name)

    inter = _read_table(inter_path, _INTER_COLUMNS)
    ts_file = _parse_timestamps(inter)
    order = np.argsort(ts_file, kind="stable")
    timestamps = ts_file[order]
    user_col = inter.columns["user_id"]
    item_col = inter.columns["item_id"]
    time_order = order.tolist()

    user_idx: dict[str, int] = {}
    users = _intern([user_col[j] for j in time_order], user_idx)
    item_idx: dict[str, int] = {PAD_TOKEN: 0}
    if PAD_TOKEN in set(item_col):
        j = item_col.index(PAD_TOKEN)
        raise DataError(
            f"{inter.name} line {inter.line(j)}: item_id {PAD_TOKEN} is reserved for padding; "
            "rename that item"
        )
    items = _intern([item_col[j] for j in time_order], item_idx)

    digests = {inter.name: inter.digest}
    entity_idx: dict[str, int] = {}
    relation_idx: dict[str, int] = {}
    triples = np.empty((0, 3), dtype=np.int64)
    if kg_path is not None:
        kg = _read_table(kg_path, _KG_COLUMNS)
        digests[kg.name] = kg.digest
        heads, rels, tails = (kg.columns[c] for c in ("head_id", "relation_id", "tail_id"))
        # Interleave heads and tails so entity indices follow first appearance in file order.
        both = [t for pair in zip(heads, tails, strict=True) for t in pair]
        ht = _intern(both, entity_idx).reshape(-1, 2)
        triples = np.column_stack([ht[:, 0], _intern(rels, relation_idx), ht[:, 1]])

    item_entity = np.full(len(item_idx), -1, dtype=np.int64)
    if link_path is not None:
        link = _read_table(link_path, _LINK_COLUMNS)
        digests[link.name] = link.digest
        link_items, link_ents = link.columns["item_id"], link.columns["entity_id"]
        ents = _intern(link_ents, entity_idx)
        for j, tok in enumerate(link_items):
            i = item_idx.get(tok, 0)
            if i == 0:
                raise DataError(
                    f"{link.name} line {link.line(j)}: item_id {tok!r} appears nowhere in "
                    f"{inter.name}; remove that row or add events for the item"
                )
            if item_entity[i] >= 0 and item_entity[i] != ents[j]:
                raise DataError(
                    f"{link.name} line {link.line(j)}: item_id {tok!r} is linked to a second "
                    f"entity {link_ents[j]!r}; keep one entity per item"
                )
            item_entity[i] = ents[j]

    fp = hashlib.sha256()
    for fname in sorted(digests):
        fp.update(f"{fname}\t{digests[fname]}\n".encode())

    return Dataset(
        name=name,
        path=folder.resolve(),
        fingerprint=fp.hexdigest(),
        user_tokens=list(user_idx),
        item_tokens=list(item_idx),
        users=_frozen(users),
        items=_frozen(items),
        timestamps=_frozen(timestamps),
        entity_tokens=list(entity_idx),
        relation_tokens=list(relation_idx),
        triples=_frozen(triples),
        item_entity=_frozen(item_entity),
    )
