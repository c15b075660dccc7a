"""The settings of the model, its training and TransE: plain dataclasses, no PyTorch.

Kept apart from the modules that use them so that the command line can read their defaults (its
flags' defaults are these fields') without importing PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Settings added after the first checkpoints, whose defaults are not what those checkpoints were
# trained with: an older checkpoint, which does not name them, loads with these values.
KSR_SETTINGS_BEFORE_THEY_EXISTED = {"hidden_dropout": 0.0, "score_temperature": 0.0}


@dataclass(frozen=True)
class KSRConfig:
    """Every size and switch of the model; stored in the checkpoint's metadata."""

    n_items: int  # including padding row 0
    n_relations: int  # A, memory slots (0 when memory is off)
    kb_dim: int = 64  # D, TransE dimension
    item_dim: int = 64  # E
    hidden_dim: int = 128  # H
    out_dim: int = 64  # O
    memory: bool = True  # False: the GRU4Rec ablation (no memory, no KB item features)
    hops: int = 1  # memory reading hops; 1 = KSR as published
    key_hashing: bool = False  # address only the slots this user has evidence for
    gamma: float = 10.0  # attention sharpness in the read (RecBole's value)
    write_transform: bool = False  # the authors' tanh(W e_i + b) before the write
    dropout: float = 0.3  # on item embeddings, training only
    hidden_dropout: float = 0.5  # on the GRU outputs before f (the user side of scoring), training only
    score_temperature: float = 0.2  # > 0: f and g end in L2 normalisation, p scaled by 1/tau (score = cos / tau)

    def __post_init__(self) -> None:
        # A checkpoint's settings come through here too, so a bad one is refused when it loads.
        if not 0 <= self.score_temperature < float("inf"):  # also refuses NaN
            raise ValueError(
                f"score_temperature must be a finite number >= 0 (0 = the plain dot product), got {self.score_temperature}"
            )
        for name in ("kb_dim", "item_dim", "hidden_dim", "out_dim", "hops"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.n_relations, int) or self.n_relations < 0:
            raise ValueError(f"n_relations must be a whole number >= 0, got {self.n_relations!r}")
        if not -float("inf") < self.gamma < float("inf"):
            raise ValueError(f"gamma must be a finite number, got {self.gamma}")
        for name in ("dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """Plain dict for JSON metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> KSRConfig:
        """Inverse of `to_dict`; unknown keys are an error so stale checkpoints fail loudly."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}: checkpoint from a newer ksr?")
        # A setting that a checkpoint does not name was not there when it was trained: it gets the
        # value that gives the model it was trained as, not today's default.
        return cls(**{**KSR_SETTINGS_BEFORE_THEY_EXISTED, **values})


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the recommender's training loop."""

    model: str = "ksr"  # ksr | gru4rec | pop
    epochs: int = 200
    patience: int = 10
    batch_users: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "ce"  # ce | bpr
    seed: int = 2020
    relations: int = 10  # memory relations, by item coverage
    threads: int = 2
    max_minutes: float | None = None  # wall-clock cap on the recommender's epochs
    # Item embeddings ~ N(0, std^2) at the start. None is PyTorch's N(0, 1), which Adam's steps barely
    # move (trained embeddings kept a 0.96 correlation with their draw): the models before 0.02.
    item_init_std: float | None = 0.02
    ema: float = 0.0  # > 0: evaluate and keep an exponential moving average of the weights (decay per step)
    # > 0: the CE loss also penalises the softmax mass on items the user has already consumed, with
    # this weight (`sequence_loss`); the model is unchanged, only what training asks of it.
    seen_penalty: float = 0.0
    # > 0: when validation NDCG@10 has not improved for `lr_patience` epochs, multiply the learning
    # rate by this (PyTorch's ReduceLROnPlateau on the selection metric); 0 keeps it constant.
    lr_decay: float = 0.0
    lr_patience: int = 3
    # > 0: train on windows instead of whole sequences (truncated backpropagation, as RecBole trains on
    # at most 50 items): each user's targets in runs of `max_len`, each run fed with up to `max_len`
    # earlier items before it from a fresh state, so every target is predicted once per epoch from at
    # least min(max_len, its history) items. Evaluation and serving keep the whole history.
    max_len: int = 0
    # > 0 (CE only): label smoothing, the target's share of the loss (1 - eps) and the rest spread
    # evenly over every real item (`sequence_loss`); 0 is plain cross-entropy.
    label_smoothing: float = 0.0
    # > 1 (plain CE only): each position is also trained towards the items after the next, up to this
    # many targets in all, the j-th after the next weighted future_decay**j (weights normalised over
    # the targets the sequence still has). ml-100k users rate many films in one sitting, and the order
    # inside a sitting is arbitrary; the model and its scores are unchanged, only the training target.
    future_targets: int = 1
    future_decay: float = 0.5
    # Each epoch, shuffle the order of a user's training events that share a timestamp (half of
    # ml-100k's consecutive pairs do; their file order is arbitrary). Training only.
    shuffle_ties: bool = False

    def __post_init__(self) -> None:
        # Checked when the settings are made, not after TransE has trained.
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0 writes the initial weights), got {self.epochs}")
        if self.item_init_std is not None and self.item_init_std <= 0:
            raise ValueError(f"item_init_std must be positive, got {self.item_init_std}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.seen_penalty < 0:
            raise ValueError(f"seen_penalty must be >= 0, got {self.seen_penalty}")
        if self.seen_penalty > 0 and self.loss != "ce":
            raise ValueError("seen_penalty applies to the ce loss only")
        if not 0.0 <= self.lr_decay < 1.0:
            raise ValueError(f"lr_decay must be in [0, 1), got {self.lr_decay}")
        if self.lr_patience < 0:
            raise ValueError(f"lr_patience must be >= 0, got {self.lr_patience}")
        if self.max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {self.max_len}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.future_targets < 1:
            raise ValueError(f"future_targets must be >= 1 (1 = the next item only), got {self.future_targets}")
        if not 0.0 < self.future_decay <= 1.0:
            raise ValueError(f"future_decay must be in (0, 1], got {self.future_decay}")
        if self.future_targets > 1 and (self.loss != "ce" or self.seen_penalty > 0 or self.label_smoothing > 0):
            raise ValueError("future_targets applies to the plain ce loss only (no bpr, seen_penalty or label_smoothing)")
        if self.label_smoothing > 0 and (self.loss != "ce" or self.seen_penalty > 0):
            raise ValueError("label_smoothing applies to the plain ce loss only (no bpr, no seen_penalty)")
        if self.max_len > 0 and self.seen_penalty > 0:
            raise ValueError("seen_penalty needs whole sequences (max_len 0): a window does not hold all seen items")

    def to_dict(self) -> dict:
        """Plain dict for JSON metadata."""
        return asdict(self)


@dataclass(frozen=True)
class TransEConfig:
    """TransE training settings."""

    dim: int = 64
    norm: int = 2  # 1 (L1) or 2 (L2) distance; L2 measured best (README, Recommendation quality)
    margin: float = 1.0
    epochs: int = 100
    batch_size: int = 4096
    lr: float = 0.01
    seed: int = 2020

    def to_dict(self) -> dict:
        """Plain dict for JSON metadata and cache keys."""
        return asdict(self)
