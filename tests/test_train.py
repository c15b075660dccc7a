"""Training options on a tiny synthetic data set: the item embeddings' initial scale and the
moving average of the weights that is evaluated, selected and saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import checkpoint as checkpoints
from model import data, evaluate
from model import train as training
from model.ksr import KSRConfig
from model.transe import TransEConfig
from tests.test_prequential import write_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[data.Dataset, Path]:
    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KSR_CACHE_DIR", str(root / "cache"))
        torch.set_num_threads(1)
        dataset = data.load(write_toy(root / "toy"))
        training.transe_embeddings(dataset, TransEConfig(dim=8, epochs=2))  # cached for the tests below
        yield dataset, root


SMALL = {"n_relations": 0, "kb_dim": 8, "item_dim": 64, "hidden_dim": 12, "out_dim": 8}


@pytest.mark.parametrize("model_kind", ["ksr", "gru4rec"])
def test_item_init_std_sets_the_scale_of_the_item_embeddings(toy, model_kind: str, monkeypatch) -> None:
    dataset, root = toy
    monkeypatch.setenv("KSR_CACHE_DIR", str(root / "cache"))
    config = KSRConfig(n_items=dataset.n_items, **SMALL)
    transe = TransEConfig(dim=8, epochs=2)
    stds = {}
    for std in (None, 0.02):
        torch.manual_seed(0)
        model, _ = training.build_model(
            dataset, training.TrainConfig(model=model_kind, item_init_std=std), config, transe
        )
        weight = model.item_embedding.weight.detach()
        assert torch.all(weight[0] == 0), "the padding row stays zero"
        stds[std] = weight[1:].std().item()
    assert stds[None] == pytest.approx(1.0, rel=0.15)  # PyTorch's N(0, 1)
    assert stds[0.02] == pytest.approx(0.02, rel=0.15)
    with pytest.raises(ValueError, match="item_init_std must be positive"):
        training.build_model(dataset, training.TrainConfig(model=model_kind, item_init_std=0.0), config, transe)


def test_update_average_is_an_exponential_moving_average() -> None:
    config = KSRConfig(n_items=10, n_relations=0, item_dim=4, hidden_dim=4, out_dim=4, memory=False)
    torch.manual_seed(0)
    averaged, model = training.KSR(config), training.KSR(config)
    before = [p.detach().clone() for p in averaged.parameters()]
    training.update_average(averaged, model, 0.9)
    for old, new, target in zip(before, averaged.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * target)


def test_training_with_an_average_saves_and_reports_the_average(toy, monkeypatch) -> None:
    """Same seed, same raw trajectory: the EMA run's checkpoint differs from the plain run's, and
    its recorded validation and test figures are those of the weights it saved."""
    dataset, root = toy
    monkeypatch.setenv("KSR_CACHE_DIR", str(root / "cache"))
    config = KSRConfig(n_items=dataset.n_items, **SMALL)
    transe = TransEConfig(dim=8, epochs=2)
    metas = {}
    for ema in (0.0, 0.5):
        settings = training.TrainConfig(epochs=3, patience=10, threads=1, batch_users=4, ema=ema,
                                        item_init_std=0.1)
        metas[ema] = training.train(dataset, root / f"ema{ema}", settings, config, transe)
    plain, averaged = checkpoints.load(root / "ema0.0"), checkpoints.load(root / "ema0.5")
    assert not torch.allclose(plain.model.item_embedding.weight, averaged.model.item_embedding.weight)
    for ema, loaded in ((0.0, plain), (0.5, averaged)):
        again = evaluate.evaluate_loo_ksr(loaded.model, evaluate.LeaveOneOut.from_dataset(dataset))
        assert again["valid"] == metas[ema]["metrics"]["valid"]
        assert again["test"] == metas[ema]["metrics"]["test"]
    with pytest.raises(ValueError, match="ema must be in"):
        training.train(dataset, root / "bad", training.TrainConfig(epochs=1, ema=1.0), config, transe)


def test_lr_decay_lowers_the_rate_after_epochs_without_a_validation_gain(toy, monkeypatch) -> None:
    """With patience 0 every epoch that does not beat the best validation NDCG@10 so far multiplies
    the rate by the decay; the history records the rate each epoch trained with."""
    dataset, root = toy
    monkeypatch.setenv("KSR_CACHE_DIR", str(root / "cache"))
    config = KSRConfig(n_items=dataset.n_items, **SMALL)
    settings = training.TrainConfig(epochs=8, patience=100, threads=1, batch_users=4, lr=0.05,
                                    lr_decay=0.5, lr_patience=0, item_init_std=0.1)
    meta = training.train(dataset, root / "lr_decay", settings, config, TransEConfig(dim=8, epochs=2))
    rate, best, drops = 0.05, float("-inf"), 0
    for epoch in meta["history"]:
        assert epoch["lr"] == pytest.approx(rate)
        if epoch["valid_ndcg@10"] > best:
            best = epoch["valid_ndcg@10"]
        else:
            rate, drops = rate * 0.5, drops + 1
    assert drops >= 1, "the toy run never stalled, so this test did not test the decay"
    constant = training.train(dataset, root / "lr_constant", training.TrainConfig(
        epochs=2, patience=100, threads=1, batch_users=4, lr=0.05, item_init_std=0.1), config,
        TransEConfig(dim=8, epochs=2))
    assert [epoch["lr"] for epoch in constant["history"]] == [0.05, 0.05]


def test_checkpoints_from_before_the_init_setting_are_retrained_from_the_old_scale() -> None:
    """The prequential protocol retrains a model with a checkpoint's recorded settings: one that
    records no `item_init_std` was trained from PyTorch's N(0, 1), not from today's default."""
    from types import SimpleNamespace

    from model.prequential import checkpoint_settings

    config = KSRConfig(n_items=10, n_relations=0, memory=False).to_dict()
    old = SimpleNamespace(kind="gru4rec", meta={"train": {"lr": 0.003}, "config": config, "transe": None})
    new = SimpleNamespace(kind="gru4rec", meta={"train": {"lr": 0.003, "item_init_std": 0.05},
                                                "config": config, "transe": None})
    assert checkpoint_settings(old)[0].item_init_std is None
    assert checkpoint_settings(new)[0].item_init_std == 0.05
    assert training.TrainConfig().item_init_std == 0.02


def test_seen_share_counts_consumed_items_in_the_unmasked_top_10(toy, monkeypatch) -> None:
    """Against the definition, one user at a time through the streaming step; and the test hits
    with the consumed items masked, as the worker serves."""
    dataset, root = toy
    monkeypatch.setenv("KSR_CACHE_DIR", str(root / "cache"))
    # The plain product: the last check (masking finds more targets) was calibrated on it.
    config = KSRConfig(n_items=dataset.n_items, **SMALL, score_temperature=0.0, hidden_dropout=0.0)
    training.train(dataset, root / "share", training.TrainConfig(epochs=1, threads=1, batch_users=4),
                   config, TransEConfig(dim=8, epochs=2))
    model = checkpoints.load(root / "share").model
    split = evaluate.LeaveOneOut.from_dataset(dataset)
    seen = slots = hits = masked_hits = 0
    with torch.no_grad():
        for user in split.evaluated_users():
            history, target = split.sequences[user][:-1], int(split.sequences[user][-1])
            scores, _ = model.score(model.replay(torch.tensor(history.tolist()).view(1, -1)))
            scores[0, 0] = float("-inf")
            top = scores[0].topk(10).indices.tolist()
            seen += len(set(top) & set(history.tolist()))
            slots += 10
            hits += target in top
            scores[0, torch.tensor(history.tolist())] = float("-inf")
            masked_hits += target in scores[0].topk(10).indices.tolist() and target not in history.tolist()
    result = evaluate.evaluate_loo_ksr(model, split, seen_share=True)
    share = result["test"]["seen_share@10"]
    assert 0 < share < 1
    assert share == pytest.approx(seen / slots)
    users = len(split.evaluated_users())
    assert result["test"]["hit@10"] == pytest.approx(hits / users, abs=1e-6)
    assert result["test_seen_masked"]["hit@10"] == pytest.approx(masked_hits / users, abs=1e-6)
    assert masked_hits > hits  # the masked list holds more of the unseen targets


def test_seen_items_marks_each_item_from_its_first_position_on() -> None:
    items = torch.tensor([[3, 1, 3, 2], [2, 4, 0, 0]])  # the second row is padded after 2 events
    seen = training.seen_items(items, 5)
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    for row in range(2):
        for t in range(4):
            for item in items[row, : t + 1].tolist():
                if item:
                    expected[row, t, item] = True
    assert torch.equal(seen, expected)
    assert not seen[..., 0].any(), "padding is never seen"


def test_the_seen_penalty_adds_minus_log_of_the_unseen_mass_to_cross_entropy() -> None:
    from torch.nn import functional as F

    from model.ksr import KSR, sequence_loss

    torch.manual_seed(0)
    model = KSR(KSRConfig(n_items=7, n_relations=0, item_dim=4, hidden_dim=4, out_dim=4, memory=False))
    users = torch.randn(3, 4)
    targets = torch.tensor([1, 5, 6])
    seen = torch.zeros(3, 7, dtype=torch.bool)
    seen[0, [2, 3]] = seen[1, 4] = seen[2, [1, 2, 3, 4]] = True
    plain = sequence_loss(model, users, targets)
    with torch.no_grad():
        logits = users @ model.item_vectors().T
        logits[:, 0] = float("-inf")
        probs = F.softmax(logits, dim=-1)
        unseen = 1 - (probs * seen).sum(-1)
    for weight in (0.5, 2.0):
        penalised = sequence_loss(model, users, targets, seen=seen, seen_penalty=weight)
        torch.testing.assert_close(penalised, plain + weight * -unseen.log().mean())
    torch.testing.assert_close(sequence_loss(model, users, targets, seen=seen, seen_penalty=0.0), plain)
    with pytest.raises(ValueError, match="needs the seen items"):
        sequence_loss(model, users, targets, seen_penalty=1.0)


def test_label_smoothing_spreads_a_share_of_the_loss_over_the_real_items() -> None:
    from torch.nn import functional as F

    from model.ksr import KSR, sequence_loss

    torch.manual_seed(0)
    model = KSR(KSRConfig(n_items=7, n_relations=0, item_dim=4, hidden_dim=4, out_dim=4, memory=False))
    users = torch.randn(3, 4)
    targets = torch.tensor([1, 5, 6])
    with torch.no_grad():
        logits = users @ model.item_vectors().T
        logits[:, 0] = float("-inf")
        log_probs = F.log_softmax(logits, dim=-1)[:, 1:]  # the real items; padding has no probability
        nll = -log_probs.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
        spread = -log_probs.mean(-1)
    for eps in (0.1, 0.5):
        smoothed = sequence_loss(model, users, targets, label_smoothing=eps)
        assert torch.isfinite(smoothed)
        torch.testing.assert_close(smoothed, ((1 - eps) * nll + eps * spread).mean())
    torch.testing.assert_close(sequence_loss(model, users, targets, label_smoothing=0.0), nll.mean())
    with pytest.raises(ValueError, match="do not combine"):
        sequence_loss(model, users, targets, seen=torch.zeros(3, 7, dtype=torch.bool), seen_penalty=1.0,
                      label_smoothing=0.1)


def test_future_targets_weight_the_items_after_the_next_and_stop_at_the_sequence_end() -> None:
    from torch.nn import functional as F

    from model.ksr import KSR, sequence_loss

    # The targets: for the position that predicts items[t + 1], the items at t + 2 .. t + K.
    items = torch.tensor([[4, 5, 6, 2, 0], [1, 3, 0, 0, 0]])  # right-padded, lengths 4 and 2
    assert training.future_targets(items, 3).tolist() == [
        [[6, 2], [2, 0], [0, 0], [0, 0]],
        [[0, 0], [0, 0], [0, 0], [0, 0]],
    ]
    torch.manual_seed(0)
    model = KSR(KSRConfig(n_items=7, n_relations=0, item_dim=4, hidden_dim=4, out_dim=4, memory=False))
    users = torch.randn(3, 4)
    targets = torch.tensor([1, 5, 6])
    future = torch.tensor([[2, 3], [4, 0], [0, 0]])  # two, one and no items after the target
    with torch.no_grad():
        logits = users @ model.item_vectors().T
        logits[:, 0] = float("-inf")
        nll = -F.log_softmax(logits, dim=-1)
    decay = 0.5
    expected = torch.stack([
        (nll[0, 1] + decay * nll[0, 2] + decay**2 * nll[0, 3]) / (1 + decay + decay**2),
        (nll[1, 5] + decay * nll[1, 4]) / (1 + decay),
        nll[2, 6],
    ]).mean()
    torch.testing.assert_close(sequence_loss(model, users, targets, future=future, future_decay=decay), expected)
    # No future items at all is the plain cross-entropy.
    torch.testing.assert_close(sequence_loss(model, users, targets, future=torch.zeros(3, 2, dtype=torch.long)),
                               sequence_loss(model, users, targets))
    with pytest.raises(ValueError, match="plain cross-entropy only"):
        sequence_loss(model, users, targets, label_smoothing=0.1, future=future)


def test_shuffling_ties_permutes_only_events_that_share_a_timestamp() -> None:
    sequence = np.array([7, 3, 4, 5, 9, 2])
    stamps = np.array([10.0, 20.0, 20.0, 20.0, 30.0, 40.0])
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(50):
        (shuffled,) = training.shuffle_within_ties([sequence], [stamps], rng)
        assert shuffled[0] == 7 and shuffled[4:].tolist() == [9, 2]  # events at other times stay put
        assert sorted(shuffled[1:4].tolist()) == [3, 4, 5]
        orders.add(tuple(shuffled[1:4].tolist()))
    assert len(orders) == 6  # every order of the three tied events comes up


def test_training_with_the_seen_penalty_lowers_the_seen_share(toy, monkeypatch) -> None:
    """Same seed and data: the penalty moves the model's top 10 away from what users consumed."""
    dataset, root = toy
    monkeypatch.setenv("KSR_CACHE_DIR", str(root / "cache"))
    config = KSRConfig(n_items=dataset.n_items, **SMALL)
    transe = TransEConfig(dim=8, epochs=2)
    split = evaluate.LeaveOneOut.from_dataset(dataset)
    shares = {}
    for weight in (0.0, 5.0):
        settings = training.TrainConfig(epochs=8, patience=100, threads=1, batch_users=4, seen_penalty=weight)
        meta = training.train(dataset, root / f"seen{weight}", settings, config, transe)
        assert meta["train"]["seen_penalty"] == weight
        model = checkpoints.load(root / f"seen{weight}").model
        shares[weight] = evaluate.evaluate_loo_ksr(model, split, seen_share=True)["test"]["seen_share@10"]
    assert shares[5.0] < shares[0.0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--ema", "1"], "ema must be in [0, 1), got 1.0"),
    (["--item-init-std", "0"], "item_init_std must be positive, got 0.0"),
    (["--seen-penalty", "-1"], "seen_penalty must be >= 0, got -1.0"),
    (["--seen-penalty", "1", "--loss", "bpr"], "seen_penalty applies to the ce loss only"),
    (["--lr-decay", "1"], "lr_decay must be in [0, 1), got 1.0"),
    (["--lr-patience", "-1"], "lr_patience must be >= 0, got -1"),
    (["--epochs", "-1"], "epochs must be >= 0 (0 writes the initial weights), got -1"),
    (["--max-len", "-1"], "max_len must be >= 0, got -1"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1), got 1.0"),
    (["--label-smoothing", "0.1", "--loss", "bpr"],
     "label_smoothing applies to the plain ce loss only (no bpr, no seen_penalty)"),
    (["--hops", "0"], "hops must be a whole number >= 1, got 0"),
    (["--hidden-dropout", "1"], "hidden_dropout must be in [0, 1), got 1.0"),
    (["--future-targets", "0"], "future_targets must be >= 1 (1 = the next item only), got 0"),
    (["--future-decay", "0"], "future_decay must be in (0, 1], got 0.0"),
    (["--future-targets", "3", "--loss", "bpr"],
     "future_targets applies to the plain ce loss only (no bpr, seen_penalty or label_smoothing)"),
    (["--max-len", "50", "--seen-penalty", "1"],
     "seen_penalty needs whole sequences (max_len 0): a window does not hold all seen items"),
])
def test_train_refuses_bad_settings_before_it_starts(tmp_path, flags: list[str], message: str) -> None:
    import subprocess

    from conftest import KSR, REPO

    result = subprocess.run([*KSR, "train", "--data", "ml-100k", "--out", str(tmp_path / "out"), *flags],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ksr train: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 50])
def test_training_windows_predict_every_target_once_from_at_least_max_len_items(max_len: int) -> None:
    """Over a user's windows the trained positions' targets are its items after the first, each once
    and in order, and each is predicted from min(max_len, its history) to 2 * max_len - 1 items."""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 100, size=n) for n in (1, 2, 3, 10, 49, 50, 51, 120)]
    for sequence in sequences:
        windows = training.training_windows([sequence], max_len)
        if len(sequence) < 2:
            assert windows == []
            continue
        items, _, valid = training.batch_tensors(windows)
        targets, contexts = [], []
        for row in range(len(windows)):
            for position in torch.nonzero(valid[row]).flatten().tolist():
                targets.append(int(items[row, position + 1]))
                contexts.append(position + 1)  # the items the user vector at `position` has seen
        assert targets == sequence[1:].tolist()
        for index, context in enumerate(contexts, start=1):  # target `index` of the sequence
            assert min(max_len, index) <= context <= max(2 * max_len - 1, min(max_len, index)), (index, context)
    # max_len 0 (the default): whole sequences, every position trained.
    whole = training.training_windows(sequences, 0)
    assert [len(w) for w, _ in whole] == [2, 3, 10, 49, 50, 51, 120] and {skip for _, skip in whole} == {0}


def test_training_on_windows_runs_and_is_recorded(toy, monkeypatch) -> None:
    dataset, root = toy
    monkeypatch.setenv("KSR_CACHE_DIR", str(root / "cache"))
    config = KSRConfig(n_items=dataset.n_items, **SMALL)
    settings = training.TrainConfig(epochs=2, patience=100, threads=1, batch_users=4, max_len=3)
    meta = training.train(dataset, root / "windows", settings, config, TransEConfig(dim=8, epochs=2))
    assert meta["train"]["max_len"] == 3 and len(meta["history"]) == 2
    assert all(0 < epoch["loss"] < 100 for epoch in meta["history"])
