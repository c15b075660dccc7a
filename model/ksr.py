"""KSR: a GRU over the item sequence plus a key-value memory of attribute-level preference.

Huang, Zhao, Dou, Wen, Chang (SIGIR 2018), "Improving Sequential Recommendation with
Knowledge-Enhanced Memory Networks". The equations are those of DESIGN.md ("The model, exactly"):

    (1) h <- GRU(q_i, h)
    (2) for every relation a, when item i has a KB entity:
            t_a = e_i + r_a;  z_a = sigmoid(v_a . t_a);  v_a <- (1 - z_a) v_a + z_a t_a
    (3) k = tanh(W_k h + b_k);  w = softmax_a(gamma * k . r_a);  m = sum_a w_a v_a
    (4) p = f([h; m]);  s_j = g([q_j; e_j]);  score_j = p . s_j

Two entry points share one set of weights: `step` (a batch of users, one event each: what the
streaming worker calls) and `forward` (padded sequences: what training calls). Feeding a user's events
one at a time through `step` gives the same state and scores as `forward` over the whole sequence.

Shapes: B users in a batch, T time steps, A memory relations, D knowledge-base (TransE) dimension,
H GRU hidden size, E item embedding size, O the size of the shared user/item scoring space, N items
(row 0 is padding and never recommended).

Options from the memory-network lineage, both in the read (3):
- hops > 1: End-To-End Memory Networks; each hop refines the query, k_{h+1} = k_h + H_h m_h.
- key_hashing: Key-Value Memory Networks' pre-selection; only slots for which the user has evidence
  (a consumed item with a real triple of that relation) are addressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.config import KSRConfig

# The serving forward runs the GRU of a wide, full block (at least this many users, and at least
# this share of its cells real events, not padding) with PyTorch's batched products over the padded
# block; any other block cell by cell in the compiled loop (model/kernels.py; README, Speed).
SERVING_BATCHED_GRU_MIN_USERS = 32
SERVING_BATCHED_GRU_MIN_FILL = 0.75


@dataclass
class UserState:
    """Per-user recurrent state for a batch of B users (all tensors share the batch dimension)."""

    hidden: Tensor  # (B, H) GRU state h
    memory_values: Tensor  # (B, A, D) v_1..v_A
    evidence: Tensor  # (B, A) 1.0 where the user consumed an item with a real triple of relation a

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @staticmethod
    def stack(states: list[UserState]) -> UserState:
        """Concatenate several states along the batch dimension."""
        return UserState(
            torch.cat([s.hidden for s in states]),
            torch.cat([s.memory_values for s in states]),
            torch.cat([s.evidence for s in states]),
        )

    def index(self, rows: Tensor | slice | int) -> UserState:
        """The states of a subset of the batch (rows keep their dimension when `rows` is an int)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return UserState(self.hidden[rows], self.memory_values[rows], self.evidence[rows])


class KSR(nn.Module):
    """The KSR recommender (or, with `memory=False`, its GRU4Rec ablation)."""

    def __init__(
        self,
        config: KSRConfig,
        item_entity_vectors: Tensor | None = None,
        item_has_entity: Tensor | None = None,
        item_relation_mask: Tensor | None = None,
        relation_keys: Tensor | None = None,
    ) -> None:
        """Build the model.

        item_entity_vectors (N, D): TransE e_i per item, zero where the item has no entity.
        item_has_entity (N,): bool, whether the memory is written for the item.
        item_relation_mask (N, A): bool, the item's entity heads a real triple of relation a.
        relation_keys (A, D): TransE r_a of the memory relations.
        All four are frozen buffers; they may be omitted when loading a checkpoint's state dict.
        """
        super().__init__()
        c = config
        self.config = c
        n, a, d = c.n_items, (c.n_relations if c.memory else 0), c.kb_dim
        self.item_embedding = nn.Embedding(n, c.item_dim, padding_idx=0)
        self.gru = nn.GRU(c.item_dim, c.hidden_dim, batch_first=True)
        self.embedding_dropout = nn.Dropout(c.dropout)
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)

        def buffer(value: Tensor | None, shape: tuple, dtype: torch.dtype) -> Tensor:
            if value is None:
                return torch.zeros(shape, dtype=dtype)
            if tuple(value.shape) != shape:
                raise ValueError(f"expected shape {shape}, got {tuple(value.shape)}")
            return value.to(dtype)

        kb = d if c.memory else 0
        self.register_buffer("item_entity_vectors", buffer(item_entity_vectors, (n, kb), torch.float32))
        self.register_buffer("item_has_entity", buffer(item_has_entity, (n,), torch.bool))
        self.register_buffer("item_relation_mask", buffer(item_relation_mask, (n, a), torch.bool))
        self.register_buffer("relation_keys", buffer(relation_keys, (a, kb), torch.float32))

        if c.memory:
            self.query = nn.Linear(c.hidden_dim, d)  # W_k, b_k of (3)
            self.hop_updates = nn.ModuleList(
                nn.Linear(d, d, bias=False) for _ in range(c.hops - 1)
            )  # H_h of the multi-hop read
            self.write_transform = nn.Linear(d, d) if c.write_transform else None
        self.user_projection = nn.Linear(c.hidden_dim + kb, c.out_dim)  # f of (4)
        self.item_projection = nn.Linear(c.item_dim + kb, c.out_dim)  # g of (4)

    # ----------------------------------------------------------------------------- state
    def initial_state(self, batch_size: int) -> UserState:
        """The state of a user with no events: zero GRU state, empty memory."""
        c = self.config
        a = c.n_relations if c.memory else 0
        like = self.item_embedding.weight
        return UserState(
            like.new_zeros(batch_size, c.hidden_dim),
            like.new_zeros(batch_size, a, c.kb_dim if c.memory else 0),
            like.new_zeros(batch_size, a),
        )

    # ----------------------------------------------------------------------------- write
    def _write_entities(self, items: Tensor) -> Tensor:
        """e_i as the write uses it: (...,) item ids -> (..., D) (D = 0 without the memory)."""
        entity = self.item_entity_vectors[items]  # (..., D)
        if self.config.memory and self.write_transform is not None:
            entity = torch.tanh(self.write_transform(entity))  # the authors' variant
        return entity

    def _write_targets(self, items: Tensor) -> Tensor:
        """t_a = e_i + r_a for every relation: (..., ) item ids -> (..., A, D)."""
        return self._write_entities(items).unsqueeze(-2) + self.relation_keys  # (..., A, D)

    def memory_write(self, memory_values: Tensor, items: Tensor) -> Tensor:
        """Equation (2) for one event per user: (B, A, D), (B,) -> (B, A, D)."""
        targets = self._write_targets(items)  # (B, A, D)
        gate = torch.sigmoid((memory_values * targets).sum(-1, keepdim=True))  # z_a: (B, A, 1)
        written = (1 - gate) * memory_values + gate * targets
        # Items without a KB entity leave the memory untouched.
        return torch.where(self.item_has_entity[items].view(-1, 1, 1), written, memory_values)

    # ----------------------------------------------------------------------------- read
    def memory_read(self, hidden: Tensor, memory_values: Tensor, evidence: Tensor) -> tuple[Tensor, Tensor]:
        """Equation (3), with optional hops and key hashing.

        hidden (..., H), memory_values (..., A, D), evidence (..., A) ->
        m (..., D) and the last hop's attention weights w (..., A), the explanation.
        """
        query = torch.tanh(self.query(hidden))  # k: (..., D)
        addressable = None
        if self.config.key_hashing:
            addressable = evidence > 0  # (..., A)
        for hop in range(self.config.hops):
            logits = self.config.gamma * (query @ self.relation_keys.T)  # (..., A)
            if addressable is not None:
                logits = logits.masked_fill(~addressable, float("-inf"))
            weights = torch.softmax(logits, dim=-1)
            if addressable is not None:
                # A user with no evidence at all reads nothing (softmax over no slots).
                weights = torch.nan_to_num(weights, nan=0.0)
            read = (weights.unsqueeze(-1) * memory_values).sum(-2)  # m: (..., D)
            if hop + 1 < self.config.hops:
                query = query + self.hop_updates[hop](read)  # k_{h+1} = k_h + H_h m_h
        return read, weights

    # ----------------------------------------------------------------------------- scoring
    def item_vectors(self) -> Tensor:
        """s_j = g([q_j; e_j]) for the whole catalog: (N, O). The one place the item matrix is built."""
        parts = [self.item_embedding.weight]
        if self.config.memory:
            parts.append(self.item_entity_vectors)
        items = self.item_projection(torch.cat(parts, dim=-1))
        if self.config.score_temperature > 0:
            items = F.normalize(items, dim=-1)
        return items

    def user_vector(self, state: UserState) -> tuple[Tensor, Tensor]:
        """p = f([h; m]) and the read weights: state of B users -> (B, O), (B, A)."""
        return self._user_vector(state.hidden, state.memory_values, state.evidence)

    def _user_vector(self, hidden: Tensor, memory_values: Tensor, evidence: Tensor) -> tuple[Tensor, Tensor]:
        if not self.config.memory:
            return self._scaled(self.user_projection(hidden)), hidden.new_zeros(*hidden.shape[:-1], 0)
        read, weights = self.memory_read(hidden, memory_values, evidence)
        return self._scaled(self.user_projection(torch.cat([hidden, read], dim=-1))), weights

    def _scaled(self, user: Tensor) -> Tensor:
        """The end of f: with a score temperature tau, p / |p| / tau (so p . s = cos(p, s) / tau)."""
        tau = self.config.score_temperature
        if tau <= 0:
            return user
        # F.normalize(user) / tau in fewer operations (a few microseconds less per batch); same eps.
        return user * ((1.0 / tau) / torch.linalg.vector_norm(user, dim=-1, keepdim=True).clamp_min(1e-12))

    def score(self, state: UserState, item_vectors: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scores over the catalog (B, N) and explanation weights (B, A) for a batch of states.

        Pass `item_vectors` (from `item_vectors()`) to reuse it across batches at serving time.
        """
        if item_vectors is None:
            item_vectors = self.item_vectors()
        user, weights = self.user_vector(state)
        return user @ item_vectors.T, weights

    # ----------------------------------------------------------------------------- streaming step
    def step(self, state: UserState, items: Tensor) -> UserState:
        """Apply one event to each of B users: equations (1) and (2). items: (B,) item ids."""
        q = self.embedding_dropout(self.item_embedding(items))  # (B, E)
        # The GRU's own weights through the single-step kernel: the same arithmetic as nn.GRU over a
        # sequence, at half the call overhead for the small batches a stream produces.
        gru = self.gru
        hidden = torch.gru_cell(q, state.hidden, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
        if not self.config.memory:
            return UserState(hidden, state.memory_values, state.evidence)
        memory_values = self.memory_write(state.memory_values, items)
        evidence = torch.maximum(state.evidence, self.item_relation_mask[items].to(state.evidence.dtype))
        return UserState(hidden, memory_values, evidence)

    def replay(self, items: Tensor, state: UserState | None = None) -> UserState:
        """Run a (B, T) block of events through `step` in order, without padding: a helper for
        recomputing users from their stored history."""
        if state is None:
            state = self.initial_state(items.shape[0])
        for t in range(items.shape[1]):
            state = self.step(state, items[:, t])
        return state

    # ----------------------------------------------------------------------------- batch forward
    def forward(
        self, items: Tensor, lengths: Tensor, state: UserState | None = None, serving: bool = False
    ) -> tuple[Tensor, Tensor, UserState]:
        """Batch forward over right-padded sequences: the training path, and the worker's path for
        a batch that holds several events of the same user.

        items (B, T) with 0 after each user's length; lengths (B,); state: each user's state before
        the first item (None: users with no events). Returns user vectors after every position
        (B, T, O), read weights (B, T, A), and the final state of each user (after position
        length-1; a user of length 0 keeps `state`). Padded positions hold garbage; mask them.
        `serving` (no autograd, float32) runs the recurrence in a compiled kernel and the read
        only at valid positions (`_serving_forward`); padded positions then hold zeros.
        """
        batch, steps = items.shape
        if state is None:
            state = self.initial_state(batch)
        if serving and self.item_embedding.weight.dtype == torch.float32:
            return self._serving_forward(items, lengths, state)
        q = self.embedding_dropout(self.item_embedding(items))  # (B, T, E)
        # Outputs at valid positions ignore later padding.
        hiddens = self.gru(q, state.hidden.unsqueeze(0).contiguous())[0]  # (B, T, H)
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(batch, device=items.device)
        started = (lengths > 0).view(-1, 1)
        final_hidden = torch.where(started, hiddens[rows, last], state.hidden)
        # The dropout (training only) reaches scoring, never the state carried forward.
        read_hiddens = self.hidden_dropout(hiddens)
        if not self.config.memory:
            user, weights = self._user_vector(read_hiddens, None, None)
            return user, weights, UserState(final_hidden, state.memory_values, state.evidence)

        # The gated write (2) is recurrent in v, so it runs step by step; the read is batched.
        valid = torch.arange(steps, device=items.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        targets = self._write_targets(items)  # (B, T, A, D)
        writes = self.item_has_entity[items] & valid  # (B, T)
        memory_values = state.memory_values
        history = []
        for t in range(steps):
            gate = torch.sigmoid((memory_values * targets[:, t]).sum(-1, keepdim=True))
            written = (1 - gate) * memory_values + gate * targets[:, t]
            memory_values = torch.where(writes[:, t].view(-1, 1, 1), written, memory_values)
            history.append(memory_values)
        memory_history = torch.stack(history, dim=1)  # (B, T, A, D)
        relation_hits = (self.item_relation_mask[items] & valid.unsqueeze(-1)).to(hiddens.dtype)  # (B, T, A)
        evidence_history = torch.maximum(
            torch.cummax(relation_hits, dim=1).values, state.evidence.unsqueeze(1)
        )  # (B, T, A)
        user, weights = self._user_vector(read_hiddens, memory_history, evidence_history)
        final = UserState(
            final_hidden,
            torch.where(started.unsqueeze(-1), memory_history[rows, last], state.memory_values),
            torch.where(started, evidence_history[rows, last], state.evidence),
        )
        return user, weights, final

    def _serving_forward(self, items: Tensor, lengths: Tensor, state: UserState) -> tuple[Tensor, Tensor, UserState]:
        """`forward` for the worker: the recurrence of every user's events in one compiled loop
        (`model.kernels.serving_recurrence`), then the read, the fusion and the user vectors at
        the valid positions only (a batch's block is mostly padding: a few long sessions
        beside many short ones)."""
        from model import kernels  # numba: imported by the serving path only, never by training

        c = self.config
        batch, steps = items.shape
        gru = self.gru
        # A wide, full block (many users, a few steps each) runs the GRU faster as PyTorch's
        # batched products; one padded by a few long sessions faster cell by cell in the kernel.
        run_gru = not (batch >= SERVING_BATCHED_GRU_MIN_USERS
                       and int(lengths.sum()) >= SERVING_BATCHED_GRU_MIN_FILL * batch * steps)
        with torch.no_grad():
            q = self.embedding_dropout(self.item_embedding(items))
            if run_gru:
                input_gates = _numpy(F.linear(q, gru.weight_ih_l0, gru.bias_ih_l0))
                hiddens = np.empty((batch, steps, c.hidden_dim), dtype=np.float32)
            else:
                input_gates = np.empty((batch, steps, 0), dtype=np.float32)  # not read
                hiddens = _numpy(self.gru(q, state.hidden.unsqueeze(0).contiguous())[0])
            # Without the memory there are no relations (A = D = 0): the kernel writes nothing.
            a, d = self.relation_keys.shape
            entity = self._write_entities(items)  # (B, T, D)
            memory = np.empty((batch, steps, a, d), dtype=np.float32)
            evidence = np.empty((batch, steps, a), dtype=np.float32)
            kernels.serving_recurrence(
                _numpy(state.hidden), _numpy(state.memory_values), _numpy(state.evidence),
                input_gates, _numpy(lengths.to(torch.int64)), _numpy(gru.weight_hh_l0.T),
                _numpy(gru.bias_hh_l0), _numpy(entity), _numpy(self.item_has_entity[items]),
                _numpy(self.item_relation_mask[items]),
                _numpy(self.relation_keys), hiddens, memory, evidence, run_gru,
            )
            hiddens_t, memory_t, evidence_t = torch.from_numpy(hiddens), torch.from_numpy(memory), torch.from_numpy(evidence)
            valid = (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).view(-1)
            cells = valid.nonzero().squeeze(1)  # the valid positions, row-major
            user_cells, weight_cells = self._user_vector(
                self.hidden_dropout(hiddens_t.view(-1, c.hidden_dim)[cells]),
                memory_t.view(batch * steps, a, d)[cells], evidence_t.view(batch * steps, a)[cells],
            )
            user = user_cells.new_zeros(batch * steps, user_cells.shape[-1])
            user[cells] = user_cells
            weights = weight_cells.new_zeros(batch * steps, weight_cells.shape[-1])
            weights[cells] = weight_cells
            last = (lengths - 1).clamp(min=0)
            rows = torch.arange(batch)
            started = lengths > 0
            final = UserState(
                torch.where(started.view(-1, 1), hiddens_t[rows, last], state.hidden),
                torch.where(started.view(-1, 1, 1), memory_t[rows, last], state.memory_values),
                torch.where(started.view(-1, 1), evidence_t[rows, last], state.evidence),
            )
        return user.view(batch, steps, -1), weights.view(batch, steps, -1), final


def _numpy(tensor: Tensor) -> np.ndarray:
    """A C-contiguous NumPy view (or copy, when not contiguous) of a CPU tensor, for the kernel."""
    return np.ascontiguousarray(tensor.detach().numpy())


def sequence_loss(
    model: KSR,
    user_vectors: Tensor,
    targets: Tensor,
    loss: str = "ce",
    negatives: Tensor | None = None,
    seen: Tensor | None = None,
    seen_penalty: float = 0.0,
    label_smoothing: float = 0.0,
    future: Tensor | None = None,
    future_decay: float = 0.5,
) -> Tensor:
    """Next-item loss at the given positions.

    user_vectors (P, O): p after each training position; targets (P,): the item that came next.
    loss "ce": full-catalog softmax cross-entropy (padding item excluded).
    loss "bpr": -log sigmoid(s_pos - s_neg) with negatives (P,) drawn by the caller.
    seen (P, N) bool, with `seen_penalty` > 0 (CE only): adds seen_penalty * -log(1 - P_seen), where
    P_seen is the softmax mass on the items the user had consumed by that position. Training only:
    the model and its scores are unchanged; it teaches them that an item is not consumed twice.
    label_smoothing eps > 0 (plain CE only): (1 - eps) * -log p(target) + eps * the mean of -log p over
    the real items (the padding item gets no share).
    future (P, K - 1) (plain CE only): the items after the target at each position, 0 where the
    sequence has ended; position p's loss is then sum_j w_j * -log p(t_j) / sum_j w_j over the target
    (j = 0) and its future items (j = 1..K-1, those not 0), with w_j = future_decay ** j.
    """
    item_vectors = model.item_vectors()
    if loss == "ce":
        logits = user_vectors @ item_vectors.T  # (P, N)
        logits[:, 0] = float("-inf")
        if future is not None and (seen_penalty > 0 or label_smoothing > 0):
            raise ValueError("future targets combine with the plain cross-entropy only")
        if label_smoothing > 0:
            if seen_penalty > 0:
                raise ValueError("label smoothing and the seen-item penalty do not combine")
            return F.cross_entropy(logits[:, 1:], targets - 1, label_smoothing=label_smoothing)
        if future is not None and future.shape[1] > 0:
            all_targets = torch.cat([targets.unsqueeze(1), future], dim=1)  # (P, K)
            weights = future_decay ** torch.arange(all_targets.shape[1], dtype=logits.dtype)
            weights = weights.unsqueeze(0) * (all_targets > 0)  # the sequence's end (padding) gets none
            nll = -F.log_softmax(logits, dim=-1).gather(1, all_targets)
            return ((nll.masked_fill(all_targets == 0, 0.0) * weights).sum(1) / weights.sum(1)).mean()
        if seen_penalty <= 0:
            return F.cross_entropy(logits, targets)
        if seen is None:
            raise ValueError("the seen-item penalty needs the seen items")
        log_probs = F.log_softmax(logits, dim=-1)
        nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        log_seen = torch.logsumexp(log_probs.masked_fill(~seen, float("-inf")), dim=-1)  # log P_seen
        # -log(1 - P_seen), kept finite where the seen items hold (almost) all of the mass.
        penalty = -torch.log1p(-torch.exp(log_seen).clamp(max=1.0 - 1e-6))
        return (nll + seen_penalty * penalty).mean()
    if loss == "bpr":
        if negatives is None:
            raise ValueError("BPR needs negatives")
        positive = (user_vectors * item_vectors[targets]).sum(-1)
        negative = (user_vectors * item_vectors[negatives]).sum(-1)
        return -F.logsigmoid(positive - negative).mean()
    raise ValueError(f"unknown loss {loss!r}: use 'ce' or 'bpr'")
