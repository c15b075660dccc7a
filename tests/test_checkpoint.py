"""Checkpoints load safely or stop with a message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import KSR, REPO

from model import checkpoint
from model.ksr import KSR as KSRModel
from model.ksr import KSRConfig


def tiny_checkpoint(path, **config) -> KSRModel:
    settings = {"n_items": 6, "n_relations": 2, "kb_dim": 4, "item_dim": 4, "hidden_dim": 4, "out_dim": 4}
    settings.update(config)
    model = KSRModel(KSRConfig(**settings))
    checkpoint.save(path, {"model": "ksr", "item_tokens": ["[PAD]", "a", "b", "c", "d", "e"],
                           "relation_tokens": ["genre", "director"]}, model=model)
    return model


def test_round_trip_keeps_weights_and_metadata(tmp_path) -> None:
    model = tiny_checkpoint(tmp_path / "ck")
    loaded = checkpoint.load(tmp_path / "ck")
    assert loaded.kind == "ksr" and loaded.version == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_pickled_object_in_weights_is_refused(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"item_embedding.weight": Payload()}, tmp_path / "ck" / "weights.pt")
    with pytest.raises(checkpoint.CheckpointError, match="could not be loaded safely"):
        checkpoint.load(tmp_path / "ck")
    assert not (tmp_path / "pwned").exists()


def test_mismatched_dimensions_say_what_to_do(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["config"]["hidden_dim"] = 8
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="weights do not match.*retrain"):
        checkpoint.load(tmp_path / "ck")


def test_relation_count_mismatch_is_reported(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["relation_tokens"] = ["genre"]
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="expects 2 relations.*names 1"):
        checkpoint.load(tmp_path / "ck")


@pytest.mark.parametrize("temperature", [-0.1, float("nan"), float("inf")])
def test_a_bad_score_temperature_is_refused(tmp_path, temperature) -> None:
    tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["config"]["score_temperature"] = temperature
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="score_temperature must be a finite number >= 0"):
        checkpoint.load(tmp_path / "ck")


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("hops", 0, "hops must be a whole number >= 1, got 0"),
    ("hidden_dim", -4, "hidden_dim must be a whole number >= 1, got -4"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("gamma", float("nan"), "gamma must be a finite number, got nan"),
])
def test_impossible_model_settings_are_refused(tmp_path, setting, value, message) -> None:
    tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["config"][setting] = value
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(tmp_path / "ck")


@pytest.mark.parametrize(("meta_bytes", "message"), [
    (None, "version must be a whole number from 1 to 4294967295, got 4294967296"),  # a state holds 32 bits
    (b"\xff\xfe", "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
])
def test_damaged_metadata_is_refused(tmp_path, meta_bytes, message) -> None:
    tiny_checkpoint(tmp_path / "ck")
    if meta_bytes is None:
        meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
        meta_bytes = json.dumps({**meta, "version": 2**32}).encode()
    (tmp_path / "ck" / "meta.json").write_bytes(meta_bytes)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(tmp_path / "ck")


def test_weights_that_went_nan_are_refused(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    weights = torch.load(tmp_path / "ck" / "weights.pt", weights_only=True)
    name = next(n for n, t in weights.items() if t.is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    torch.save(weights, tmp_path / "ck" / "weights.pt")
    with pytest.raises(checkpoint.CheckpointError, match=f"NaN or infinite values \\({name}"):
        checkpoint.load(tmp_path / "ck")


@torch.no_grad()
def test_a_score_temperature_round_trips_and_scores_cosines(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck", score_temperature=0.25)
    model = checkpoint.load(tmp_path / "ck").model
    assert model.config.score_temperature == 0.25
    items = model.item_vectors()
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(len(items)))
    state = model.replay(torch.tensor([[1, 2, 3]]))
    user, _ = model.user_vector(state)
    torch.testing.assert_close(user.norm(dim=-1), torch.tensor([4.0]))  # 1 / tau
    scores, _ = model.score(state, items)
    assert scores.abs().max() <= 4.0 + 1e-5  # cosines times 1 / tau


@torch.no_grad()
def test_a_checkpoint_from_before_the_cosine_scores_loads_as_the_plain_product(tmp_path) -> None:
    """Today's defaults are cosine scores with hidden dropout; a checkpoint written before those
    settings existed does not name them, and must load as the model it was trained as."""
    trained = tiny_checkpoint(tmp_path / "ck", score_temperature=0.0, hidden_dropout=0.0)
    assert KSRConfig(n_items=6, n_relations=2).score_temperature > 0  # the default is the cosine
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    del meta["config"]["score_temperature"], meta["config"]["hidden_dropout"]
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    model = checkpoint.load(tmp_path / "ck").model
    assert (model.config.score_temperature, model.config.hidden_dropout) == (0.0, 0.0)
    state = model.replay(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(model.score(state, model.item_vectors())[0],
                               trained.eval().score(trained.replay(torch.tensor([[1, 2, 3]])),
                                                    trained.item_vectors())[0])


def test_missing_checkpoint_points_at_ksr_train(tmp_path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="ksr train"):
        checkpoint.load(tmp_path / "nothing-here")


def test_save_replaces_a_checkpoint_whole(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    tiny_checkpoint(tmp_path / "ck", hidden_dim=8)
    assert checkpoint.load(tmp_path / "ck").model.config.hidden_dim == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_worker_refuses_to_start_on_a_bad_checkpoint(tmp_path) -> None:
    env = {**os.environ, "KSR_CHECKPOINT": str(tmp_path / "missing"), "KSR_VAR_DIR": str(tmp_path)}
    result = subprocess.run([*KSR, "worker"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2
    assert "cannot serve" in result.stderr and "ksr train" in result.stderr


def test_worker_refuses_a_bad_setting(tmp_path) -> None:
    env = {**os.environ, "KSR_BATCH_SIZE": "lots", "KSR_VAR_DIR": str(tmp_path)}
    result = subprocess.run([*KSR, "worker"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2
    assert "KSR_BATCH_SIZE must be a positive integer, got 'lots'" in result.stderr


def test_recommend_names_an_unknown_item(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    result = subprocess.run([*KSR, "recommend", "--checkpoint", str(tmp_path / "ck"), "--items", "a,zz"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode != 0 and "unknown item id 'zz'" in result.stderr


def test_recommend_refuses_a_top_k_of_nothing(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    result = subprocess.run([*KSR, "recommend", "--checkpoint", str(tmp_path / "ck"), "--items", "a", "--k", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "--k" in result.stderr


def test_recommend_excludes_the_history_and_explains(tmp_path) -> None:
    tiny_checkpoint(tmp_path / "ck")
    result = subprocess.run([*KSR, "recommend", "--checkpoint", str(tmp_path / "ck"), "--items", "a,b",
                             "--k", "3", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    payload = json.loads(result.stdout)
    assert len(payload["items"]) == 3 and not {"a", "b"} & set(payload["items"])
    assert {e["relation"] for e in payload["explanation"]} == {"genre", "director"}


def test_ranking_keeps_only_unseen_items_and_orders_the_explanation(tmp_path) -> None:
    """A history that leaves fewer than k items gets fewer items, not seen or padding ones; the
    explanation is every relation, largest weight first; scores are the model's, rounded to 1e-6."""
    from model.serving import Recommender

    tiny_checkpoint(tmp_path / "ck")
    recommender = Recommender.load(tmp_path / "ck")
    histories = [[1, 2, 3], [1], []]
    state = recommender.replay(histories)
    recommendations = recommender.rank(state, histories, k=4)
    scores, weights = recommender.model.score(state)
    for history, rec, row_scores, row_weights in zip(histories, recommendations, scores, weights):
        unseen = [i for i in range(1, 6) if i not in history]
        expected = sorted(unseen, key=lambda i: -row_scores[i].item())[:4]
        assert rec.items == [recommender.item_tokens[i] for i in expected]
        assert rec.scores == [round(row_scores[i].item(), 6) for i in expected]
        assert [e["weight"] for e in rec.explanation] == sorted((e["weight"] for e in rec.explanation), reverse=True)
        by_relation = dict(zip(recommender.relation_tokens, row_weights.tolist()))
        assert {e["relation"]: e["weight"] for e in rec.explanation} == pytest.approx(by_relation, abs=1e-6)
    assert len(recommendations[0].items) == 2  # five items, three seen
