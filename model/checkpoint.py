"""Checkpoints: a folder with `weights.pt` (tensors only) and `meta.json` (everything else).

Weights load with `torch.load(weights_only=True)`, so a checkpoint that carries a pickled object is
refused rather than executed. The metadata holds dims, memory relations, id maps, the data's
fingerprint, metrics and a version number that increases with each promoted model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.ksr import KSR, KSRConfig

FORMAT = 1
WEIGHTS = "weights.pt"
# A user's stored state names the model version it was computed with in 32 bits (worker/state.py).
VERSION_MAX = 2**32 - 1
META = "meta.json"
MODEL_KINDS = ("ksr", "gru4rec", "pop")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with what to do about it."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (None for pop), popularity scores (pop only) and metadata."""

    meta: dict
    model: KSR | None
    popularity: torch.Tensor | None

    @property
    def kind(self) -> str:
        return self.meta["model"]

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 1))

    @property
    def item_tokens(self) -> list[str]:
        return self.meta["item_tokens"]

    @property
    def relation_tokens(self) -> list[str]:
        return self.meta.get("relation_tokens", [])


def save(
    directory: str | Path,
    meta: dict,
    model: KSR | None = None,
    popularity: torch.Tensor | None = None,
) -> Path:
    """Write a checkpoint atomically: into a temporary sibling folder, then renamed into place.

    An existing checkpoint at `directory` is replaced as a whole, so readers see the old or the new
    one, never a mix.
    """
    directory = Path(directory)
    if meta.get("model") not in MODEL_KINDS:
        raise CheckpointError(f"model kind must be one of {MODEL_KINDS}, got {meta.get('model')!r}")
    meta = {"format": FORMAT, "created": time.time(), "version": 1, **meta}
    if model is not None:
        meta["config"] = model.config.to_dict()
        tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    elif popularity is not None:
        tensors = {"popularity": popularity.detach().cpu()}
    else:
        raise CheckpointError("nothing to save: pass a model or popularity scores")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    torch.save(tensors, staging / WEIGHTS)
    (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(directory, retired)
        os.rename(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, directory)
    return directory


def load(directory: str | Path) -> Checkpoint:
    """Load and validate a checkpoint; raise CheckpointError saying what is wrong and what to do."""
    directory = Path(directory)
    meta_path, weights_path = directory / META, directory / WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint (needs {META} and {WEIGHTS}): "
            "train one with `ksr train --data ml-100k --out DIR`"
        )
    try:
        meta = json.loads(meta_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path} is not valid JSON ({error}): the checkpoint is damaged") from error
    except OSError as error:
        raise CheckpointError(f"{meta_path} cannot be read ({error})") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} must hold a JSON object: the checkpoint is damaged")
    version = meta.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION_MAX:
        raise CheckpointError(
            f"{meta_path}: version must be a whole number from 1 to {VERSION_MAX}, got {version!r}"
        )
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{directory}: checkpoint format {meta.get('format')!r}, this ksr reads format {FORMAT}: retrain"
        )
    kind = meta.get("model")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{directory}: unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    try:
        tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unsafe or damaged files
        raise CheckpointError(
            f"{weights_path} could not be loaded safely ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Checkpoints hold tensors only; "
            "a pickled object is refused. Re-create it with `ksr train`."
        ) from error
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{weights_path} must hold a dict of tensors: re-create it with `ksr train`")
    n_items = len(meta.get("item_tokens", []))
    if kind == "pop":
        popularity = tensors.get("popularity")
        if popularity is None or popularity.shape != (n_items,):
            raise CheckpointError(
                f"{directory}: pop checkpoint needs a popularity vector of {n_items} items: retrain"
            )
        return Checkpoint(meta, None, popularity)

    try:
        config = KSRConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory}: bad model settings in {META} ({error}): retrain") from error
    if config.n_items != n_items:
        raise CheckpointError(
            f"{directory}: the model has {config.n_items} item rows but {META} lists {n_items} items: "
            "the files come from different trainings; retrain"
        )
    relations = meta.get("relation_tokens", [])
    if config.memory and config.n_relations != len(relations):
        raise CheckpointError(
            f"{directory}: the model expects {config.n_relations} relations, {META} names "
            f"{len(relations)}: retrain or fix relation_tokens"
        )
    model = KSR(config)
    expected = model.state_dict()
    problems = [
        f"{name}: expected {tuple(expected[name].shape)}, got "
        f"{tuple(tensors[name].shape) if name in tensors else 'missing'}"
        for name in expected
        if name not in tensors or tensors[name].shape != expected[name].shape
    ]
    problems += [f"{name}: not part of this model" for name in tensors if name not in expected]
    if problems:
        raise CheckpointError(
            f"{directory}: weights do not match the settings in {META} ({'; '.join(problems[:4])}): "
            "retrain, or use the meta.json that came with these weights"
        )
    broken = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise CheckpointError(
            f"{directory}: weights hold NaN or infinite values ({', '.join(broken[:4])}): the training "
            "that wrote them diverged; retrain, or use an earlier checkpoint"
        )
    model.load_state_dict(tensors)
    model.eval()
    return Checkpoint(meta, model, None)
