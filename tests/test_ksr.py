"""The model's two entry points agree: streaming `step` event by event equals the batch `forward`."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.ksr import KSR, KSRConfig, UserState, sequence_loss

N_ITEMS, N_RELATIONS, KB_DIM = 40, 5, 8


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **options) -> KSR:
    """A small random KSR whose items 1..29 have KB entities and 30..39 do not.

    In float64 every weight and bias is drawn wide (std 0.3), so that any logic difference between
    the two paths shows far above rounding; in float32 the model keeps PyTorch's own initialisation,
    the scale it is trained from.
    """
    generator = torch.Generator().manual_seed(seed)
    memory = options.get("memory", True)
    a = N_RELATIONS if memory else 0
    # The plain dot product without dropout unless an option says otherwise (the cosine, today's
    # default, has options of its own in OPTIONS).
    settings = {"dropout": 0.0, "hidden_dropout": 0.0, "score_temperature": 0.0, **options}
    config = KSRConfig(
        n_items=N_ITEMS, n_relations=a, kb_dim=KB_DIM, item_dim=12, hidden_dim=16, out_dim=10, **settings,
    )
    kb = KB_DIM if memory else 0
    has_entity = torch.zeros(N_ITEMS, dtype=torch.bool)
    has_entity[1:30] = True
    vectors = torch.randn(N_ITEMS, kb, generator=generator) * has_entity.unsqueeze(1)
    relation_mask = (torch.rand(N_ITEMS, a, generator=generator) < 0.4) & has_entity.unsqueeze(1)
    keys = torch.randn(a, kb, generator=generator)
    torch.manual_seed(seed)
    model = KSR(config, vectors, has_entity, relation_mask, keys).to(dtype)
    if dtype == torch.float64:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.3, generator=generator)
    return model.eval()


OPTIONS = [
    {"memory": False},
    *[
        {"hops": hops, "key_hashing": hashing, "write_transform": transform}
        for hops, hashing, transform in itertools.product((1, 2, 3), (False, True), (False, True))
    ],
    {"memory": False, "score_temperature": 0.1},
    {"score_temperature": 0.1},
    {"score_temperature": 0.1, "hops": 2, "key_hashing": True},
]


def random_histories(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 7, 23, 50]
    histories = [torch.randint(1, N_ITEMS, (n,), generator=generator) for n in lengths]
    histories.append(torch.tensor([31, 32, 33, 5, 34]))  # starts with items that have no entity
    return histories


TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
# The training path in both precisions, and the worker's path (`serving=True`: the compiled
# recurrence of model/kernels.py, float32 only; a float64 model serves through the training path).
PATHS = [(torch.float32, False), (torch.float32, True), (torch.float64, False)]


def assert_forward_equals_steps(model: KSR, starts: list[UserState], sequences: list[torch.Tensor],
                                forward: tuple[torch.Tensor, torch.Tensor, UserState], tol: float) -> None:
    """Each row of a forward from `starts` over `sequences` (its user vectors, read weights and
    final states) equals stepping that row's items one at a time from its start state."""
    user_vectors, weights, final = forward
    item_vectors = model.item_vectors()
    # With a score temperature the scores are cosines times 1/tau: so is their rounding error.
    tau = model.config.score_temperature
    score_tol = tol / tau if tau > 0 else tol
    for row, (state, sequence) in enumerate(zip(starts, sequences)):
        for t, item in enumerate(sequence):
            state = model.step(state, item.view(1))
            scores, step_weights = model.score(state, item_vectors)
            torch.testing.assert_close(scores[0], user_vectors[row, t] @ item_vectors.T, atol=score_tol, rtol=tol)
            torch.testing.assert_close(step_weights[0], weights[row, t], atol=tol, rtol=tol)
        torch.testing.assert_close(state.hidden[0], final.hidden[row], atol=tol, rtol=tol)
        torch.testing.assert_close(state.memory_values[0], final.memory_values[row], atol=tol, rtol=tol)
        torch.testing.assert_close(state.evidence[0], final.evidence[row])


@pytest.mark.parametrize(("dtype", "serving"), PATHS, ids=["float32-training", "float32-serving", "float64-training"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@torch.no_grad()
def test_streaming_step_matches_batch_forward(options: dict, dtype: torch.dtype, serving: bool) -> None:
    model = make_model(dtype=dtype, **options)
    tol = TOLERANCE[dtype]
    histories = random_histories(1)
    items = torch.zeros(len(histories), max(len(h) for h in histories), dtype=torch.long)
    for row, history in enumerate(histories):
        items[row, : len(history)] = history
    lengths = torch.tensor([len(h) for h in histories])
    forward = model(items, lengths, serving=serving)
    starts = [model.initial_state(1) for _ in histories]
    assert starts[0].hidden.dtype == dtype
    assert_forward_equals_steps(model, starts, histories, forward, tol)


@pytest.mark.parametrize(("dtype", "serving"), PATHS, ids=["float32-training", "float32-serving", "float64-training"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@torch.no_grad()
def test_forward_from_a_state_continues_the_streaming_step(options: dict, dtype: torch.dtype, serving: bool) -> None:
    """The worker runs a batch's several events per user as one forward from the users' stored
    states: it must equal stepping those events one at a time from the same states."""
    model = make_model(dtype=dtype, **options)
    tol = TOLERANCE[dtype]
    histories = random_histories(3)
    cuts = [0, 1, 3, 10, 20, 2]  # prefix lengths: the state the forward starts from
    prefixes = [h[:cut] for h, cut in zip(histories, cuts)]
    suffixes = [h[cut:] for h, cut in zip(histories, cuts)]
    suffixes[1] = suffixes[1][:0]  # a user with no events in this batch keeps its state
    states = []
    for prefix in prefixes:
        state = model.initial_state(1)
        for item in prefix:
            state = model.step(state, item.view(1))
        states.append(state)
    items = torch.zeros(len(suffixes), max(len(s) for s in suffixes), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        items[row, : len(suffix)] = suffix
    lengths = torch.tensor([len(s) for s in suffixes])
    forward = model(items, lengths, UserState.stack(states), serving=serving)
    assert_forward_equals_steps(model, states, suffixes, forward, tol)
    assert torch.equal(forward[2].hidden[1], states[1].hidden[0])


@torch.no_grad()
def test_batched_step_equals_one_user_at_a_time() -> None:
    """The worker steps many users in one call; each must get what a lone step would give."""
    model = make_model(hops=2, key_hashing=True)
    histories = random_histories(2)
    states = [model.replay(h.view(1, -1)) for h in histories]
    batch = UserState.stack(states)
    next_items = torch.tensor([3, 31, 7, 8, 9, 35])
    stepped = model.step(batch, next_items)
    for row, state in enumerate(states):
        alone = model.step(state, next_items[row : row + 1])
        torch.testing.assert_close(stepped.index(row).hidden, alone.hidden, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(stepped.index(row).memory_values, alone.memory_values, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_item_without_entity_leaves_memory_unchanged() -> None:
    model = make_model()
    state = model.replay(torch.tensor([[1, 2, 3]]))
    after = model.step(state, torch.tensor([35]))  # items 30..39 have no KB entity
    assert torch.equal(after.memory_values, state.memory_values)
    assert not torch.equal(after.hidden, state.hidden)
    changed = model.step(state, torch.tensor([4]))
    assert not torch.equal(changed.memory_values, state.memory_values)


@torch.no_grad()
def test_explanation_weights_are_a_distribution_over_relations() -> None:
    model = make_model(hops=1)
    state = model.replay(torch.tensor([[1, 5, 9, 12]]))
    _, weights = model.score(state)
    assert weights.shape == (1, N_RELATIONS)
    assert torch.all(weights >= 0)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)


@torch.no_grad()
def test_key_hashing_reads_nothing_before_any_evidence() -> None:
    model = make_model(key_hashing=True)
    state = model.replay(torch.tensor([[31, 32]]))  # no KB entity: no evidence for any slot
    _, weights = model.score(state)
    assert torch.all(weights == 0)
    assert torch.all(state.evidence == 0)


@pytest.mark.parametrize("temperature", [0.0, 0.2])
@pytest.mark.parametrize("loss_name", ["ce", "bpr"])
def test_losses_train_the_model_towards_the_target(loss_name, temperature) -> None:
    model = make_model(score_temperature=temperature)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    items = torch.tensor([[1, 2, 3, 4, 5]])
    first = None
    for _ in range(30):
        user_vectors, _, _ = model(items, torch.tensor([5]))
        loss = sequence_loss(
            model, user_vectors[0], torch.tensor([2, 3, 4, 5, 6]), loss_name, torch.tensor([9] * 5)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_hidden_dropout_reaches_scoring_but_never_the_carried_state() -> None:
    """Training-time dropout on the GRU outputs changes the user vectors, not the state that the
    next event (or the worker's RocksDB) continues from; in eval mode it is off entirely."""
    model = make_model(hidden_dropout=0.5)
    items, lengths = torch.tensor([[1, 2, 3, 31, 5, 6]]), torch.tensor([6])
    with torch.no_grad():
        eval_vectors, _, eval_final = model(items, lengths)
        model.train()
        torch.manual_seed(3)
        train_vectors, _, train_final = model(items, lengths)
    assert not torch.allclose(train_vectors, eval_vectors)
    for name in ("hidden", "memory_values", "evidence"):
        torch.testing.assert_close(getattr(train_final, name), getattr(eval_final, name))


def test_the_kernel_tanh_is_within_4e_7_of_tanh() -> None:
    """The compiled recurrence's tanh and sigmoid (model/kernels.py) over every float32 scale the
    GRU meets, and far beyond it: within 4e-7 of the exact functions (float64)."""
    import numba
    import numpy as np

    from model import kernels

    @numba.njit(fastmath=kernels.FASTMATH)  # the licences of the loops that inline them
    def both(x):
        out = np.empty((2, x.shape[0]), dtype=np.float32)
        for i in range(x.shape[0]):
            out[0, i] = kernels.fast_tanh(x[i])
            out[1, i] = kernels.fast_sigmoid(x[i])
        return out

    x = np.concatenate([np.linspace(-30, 30, 2_000_001, dtype=np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, np.inf, -np.inf], dtype=np.float32)])
    tanh, sigmoid = both(x)
    exact = x.astype(np.float64)
    assert np.abs(tanh - np.tanh(exact)).max() < 4e-7
    assert np.abs(sigmoid - 0.5 * (1 + np.tanh(exact / 2))).max() < 4e-7
    assert tanh[-2] == tanh[-4] and tanh[-1] == tanh[-3] and tanh[-2] > 0.9999996  # saturates at +-1


@torch.no_grad()
def test_the_serving_path_keeps_a_memory_that_the_write_gate_shuts() -> None:
    """A memory slot so far from an item's target that exp(-v . t) overflows: the gate is 0 and the
    slot stays as it was, in the compiled write as in `step` (no NaN, no warning)."""
    model = make_model()
    state = model.initial_state(1)
    state.memory_values[:] = -1e20 * model._write_targets(torch.tensor([4]))  # v_a . t_a = -1e20 |t_a|^2
    stepped = model.step(state, torch.tensor([4]))
    _, _, final = model(torch.tensor([[4]]), torch.tensor([1]), state, serving=True)
    assert torch.equal(stepped.memory_values, state.memory_values)
    assert torch.equal(final.memory_values, state.memory_values)


@pytest.mark.parametrize("blocks", [[60], [15, 60]], ids=["one-block", "two-blocks"])
def test_the_ranking_kernel_is_torch_topk_without_the_seen_items(blocks: list[int]) -> None:
    """model/kernels.py's merge_top_k_unseen, the catalog folded in one block or in two (the tied
    scores straddling the boundary), against torch.topk over a masked copy: random rows, rows
    whose seen items leave fewer than k, a row with every item seen, and tied scores."""
    import numpy as np

    from model import kernels

    generator = np.random.default_rng(7)
    n, k = 60, 10
    scores = generator.standard_normal((8, n)).astype(np.float32)
    scores[5, 10:20] = 4.0  # ties above every other score: the lower item index first
    seen = [generator.choice(np.arange(1, n), size=size, replace=False) for size in (0, 5, 30, 50, 55, 3, 59, 0)]
    starts = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
    masked = torch.from_numpy(scores.copy())
    masked[:, 0] = float("-inf")
    for row, items in enumerate(seen):
        masked[row, torch.from_numpy(items)] = float("-inf")
    top_scores = np.full((len(seen), k), -np.inf, dtype=np.float32)
    top_items = np.zeros((len(seen), k), dtype=np.int64)
    for start, end in zip([0, *blocks], blocks):
        kernels.merge_top_k_unseen(scores[:, start:end].copy(), start, starts,
                                   np.concatenate(seen).astype(np.int64), top_scores, top_items)
    expected_scores, _ = torch.topk(masked, k, dim=1)
    assert np.array_equal(top_scores, expected_scores.numpy())
    for row in range(len(seen)):
        finite = np.isfinite(top_scores[row])
        assert finite.sum() == min(k, n - 1 - len(seen[row]))
        assert not set(top_items[row][finite]) & {0, *seen[row].tolist()}
        assert np.array_equal(masked[row, top_items[row][finite]].numpy(), top_scores[row][finite])
        assert np.all(top_items[row][~finite] == 0)
    tied = [i for i, s in zip(top_items[5], top_scores[5]) if s == np.float32(4.0)]
    assert tied == [i for i in range(10, 20) if i not in seen[5]]


def test_training_and_the_pytorch_serving_kernel_do_not_need_numba(small_checkpoint) -> None:
    """numba is imported by the compiled serving path only: training, evaluation and a Recommender
    with `compiled=False` (KSR_SERVING_KERNEL=torch) run where numba cannot be imported."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"  # any `import numba` now raises ImportError
        "import torch, model.train, model.evaluate\n"
        "from model.serving import Recommender\n"
        f"r = Recommender.load({str(small_checkpoint)!r}, compiled=False)\n"
        "state, items = r.initial_state(2), torch.tensor([[1, 2], [3, 0]])\n"
        "vectors, weights, final = r.run(state, items, torch.tensor([2, 1]))\n"
        "print(len(r.rank_vectors(vectors[:, 0], weights[:, 0], [[1], [3]], 5)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr[-2000:]


ALL_OPTIONS = {"hops": 3, "key_hashing": True, "write_transform": True, "score_temperature": 0.1}


@pytest.mark.parametrize("options", [OPTIONS[0], ALL_OPTIONS, {}], ids=["memory=False", "all-options", "defaults"])
@torch.no_grad()
def test_a_wide_full_serving_block_runs_the_batched_gru_and_matches_the_step(options: dict) -> None:
    """The serving forward runs a block of many users with few padded cells through PyTorch's
    batched GRU, and the memory write in the compiled loop: it must equal stepping too."""
    from model.ksr import SERVING_BATCHED_GRU_MIN_FILL, SERVING_BATCHED_GRU_MIN_USERS

    model = make_model(**options)
    generator = torch.Generator().manual_seed(5)
    users, steps = SERVING_BATCHED_GRU_MIN_USERS + 8, 3
    items = torch.randint(1, N_ITEMS, (users, steps), generator=generator)
    lengths = torch.full((users,), steps)
    lengths[:4] = 2  # a little padding, still above the fill that picks the batched GRU
    for row in range(4):
        items[row, 2] = 0
    assert lengths.sum() >= SERVING_BATCHED_GRU_MIN_FILL * users * steps
    start = model.replay(torch.randint(1, N_ITEMS, (users, 4), generator=generator))
    forward = model(items, lengths, start, serving=True)
    rows = [start.index(row) for row in range(users)]
    assert_forward_equals_steps(model, rows, [items[row, : int(lengths[row])] for row in range(users)], forward, 1e-5)
