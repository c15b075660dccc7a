"""Exactly-once commits off the timer (KSR_COMMIT_WHEN_IDLE): the commit loop on a stand-in
consumer, and its setting. The broker test is in test_worker.py
(test_exactly_once_answers_commit_when_the_worker_catches_up)."""

from __future__ import annotations

import asyncio

import pytest

from worker.config import ConfigError, Settings


class StandInConsumer:
    """Faust's Consumer.commit contract: one commit at a time; a call during a commit waits for
    it and returns False without committing."""

    def __init__(self, commit_seconds: float) -> None:
        self.commit_seconds = commit_seconds
        self.commits: list[tuple[float, float]] = []  # (start, end), loop time
        self._commit_fut: asyncio.Future | None = None

    async def maybe_wait_for_commit_to_finish(self) -> bool:
        if self._commit_fut is not None:
            await self._commit_fut
            return True
        return False

    async def commit(self) -> bool:
        if await self.maybe_wait_for_commit_to_finish():
            return False
        loop = asyncio.get_running_loop()
        self._commit_fut = loop.create_future()
        start = loop.time()
        try:
            await asyncio.sleep(self.commit_seconds)
            self.commits.append((start, loop.time()))
            return True
        finally:
            fut, self._commit_fut = self._commit_fut, None
            fut.set_result(None)


def idle_loop(consumer: StandInConsumer):
    """Worker._commit_when_idle bound to a stand-in worker holding `consumer`."""
    from types import SimpleNamespace

    from worker.app import Worker

    worker = SimpleNamespace(app=SimpleNamespace(consumer=consumer))
    return lambda caught_up: Worker._commit_when_idle(worker, caught_up)


def test_the_agent_catching_up_starts_a_commit() -> None:
    async def run() -> StandInConsumer:
        consumer = StandInConsumer(commit_seconds=0.01)
        caught_up = asyncio.Event()
        task = asyncio.create_task(idle_loop(consumer)(caught_up))
        await asyncio.sleep(0.05)
        assert consumer.commits == []  # nothing until the agent says it caught up
        caught_up.set()
        await asyncio.sleep(0.05)
        task.cancel()
        return consumer

    assert len(asyncio.run(run()).commits) == 1


def test_a_commit_under_way_is_followed_by_a_new_one() -> None:
    """The commit under way may have taken its offsets before the agent's last batch: the loop
    waits for it and starts another, instead of returning with the batch uncommitted."""

    async def run() -> StandInConsumer:
        consumer = StandInConsumer(commit_seconds=0.05)
        caught_up = asyncio.Event()
        timer = asyncio.create_task(consumer.commit())  # the timer's commit, under way
        await asyncio.sleep(0.01)
        task = asyncio.create_task(idle_loop(consumer)(caught_up))
        caught_up.set()
        await asyncio.sleep(0.2)
        task.cancel()
        await timer
        return consumer

    commits = asyncio.run(run()).commits
    assert len(commits) == 2
    assert commits[1][0] >= commits[0][1]  # the second began after the first ended


def test_stopping_the_loop_never_cancels_a_commit_half_done() -> None:
    async def run() -> StandInConsumer:
        consumer = StandInConsumer(commit_seconds=0.05)
        caught_up = asyncio.Event()
        task = asyncio.create_task(idle_loop(consumer)(caught_up))
        caught_up.set()
        await asyncio.sleep(0.01)  # the commit is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        return consumer

    assert len(asyncio.run(run()).commits) == 1


def test_commit_when_idle_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSR_COMMIT_WHEN_IDLE", raising=False)
    assert Settings.from_env().commit_when_idle is True
    monkeypatch.setenv("KSR_COMMIT_WHEN_IDLE", "0")
    assert Settings.from_env().commit_when_idle is False
    monkeypatch.setenv("KSR_COMMIT_WHEN_IDLE", "sometimes")
    with pytest.raises(ConfigError, match="KSR_COMMIT_WHEN_IDLE"):
        Settings.from_env()


def gated(force_commit, timeout: float):
    """Worker._gate_commits applied to a stand-in at-least-once consumer whose force_commit is
    `force_commit`; returns the gated force_commit."""
    from types import SimpleNamespace

    from worker.app import Worker

    consumer = SimpleNamespace(force_commit=force_commit, _commit_offsets=None)
    worker = SimpleNamespace(app=SimpleNamespace(consumer=consumer, in_transaction=False),
                             commit_gate=asyncio.Lock(), settings=SimpleNamespace(commit_timeout_s=timeout))
    Worker._gate_commits(worker)
    return consumer.force_commit


def test_a_commit_that_never_ends_restarts_the_worker_with_every_tasks_stack(monkeypatch, caplog) -> None:
    """Faust's commits wait for the one under way, so a commit that hangs stops every later one:
    under exactly-once no answer becomes visible while the worker looks alive. After
    KSR_COMMIT_TIMEOUT_S the worker logs where its tasks wait and exits for its supervisor."""
    from worker import app

    restarts = []
    monkeypatch.setattr(app, "exit_for_restart", lambda what, with_traceback=True: restarts.append(what))

    async def hangs(*args, **kwargs):
        await asyncio.Event().wait()

    async def run() -> None:
        commit = asyncio.create_task(gated(hangs, timeout=0.1)(), name="the-stuck-commit")
        await asyncio.sleep(0.3)
        commit.cancel()

    with caplog.at_level("ERROR"):
        asyncio.run(run())
    assert restarts == ["commit stuck"]
    assert "has not ended in 0.1 s (KSR_COMMIT_TIMEOUT_S)" in caplog.text
    # The stuck task's chain down to the innermost coroutine and what it waits for.
    assert "the-stuck-commit" in caplog.text and " in hangs" in caplog.text and "  awaiting <" in caplog.text


def test_commits_that_end_in_time_leave_the_worker_alone(monkeypatch) -> None:
    from worker import app

    restarts = []
    monkeypatch.setattr(app, "exit_for_restart", lambda what, with_traceback=True: restarts.append(what))

    async def quick(*args, **kwargs):
        await asyncio.sleep(0.01)
        return True

    async def run() -> list:
        force_commit = gated(quick, timeout=0.1)
        results = [await force_commit() for _ in range(5)]
        await asyncio.sleep(0.2)  # past the timeout of every one of them
        return results

    assert asyncio.run(run()) == [True] * 5
    assert restarts == []


def test_the_commit_timeout_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSR_COMMIT_TIMEOUT_S", raising=False)
    assert Settings.from_env().commit_timeout_s == 120.0
    monkeypatch.setenv("KSR_COMMIT_TIMEOUT_S", "0")
    with pytest.raises(ConfigError, match="KSR_COMMIT_TIMEOUT_S"):
        Settings.from_env()


def test_transactional_producers_retry_after_the_configured_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """KSR_TXN_RETRY_BACKOFF_MS reaches the producers Faust builds for its transactions (the path
    its begin_transaction takes), and aiokafka's fixed wait after ConcurrentTransactions; at
    at-least-once nothing changes."""
    from aiokafka.producer import sender

    from model.bench import _synthetic_recommender
    from worker.app import Worker

    monkeypatch.setattr(sender, "BACKOFF_OVERRIDE", 0.02)  # restored after the test
    monkeypatch.delenv("KSR_TXN_RETRY_BACKOFF_MS", raising=False)
    monkeypatch.setenv("KSR_PROCESSING_GUARANTEE", "at_least_once")
    worker = Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2)
    assert asyncio.run(_retry_backoff_of(worker, "t-0")) == 0.1  # aiokafka's default, untouched
    assert sender.BACKOFF_OVERRIDE == 0.02

    monkeypatch.setenv("KSR_PROCESSING_GUARANTEE", "exactly_once")
    settings = Settings.from_env()
    assert settings.txn_retry_backoff_ms == 5
    worker = Worker(settings, _synthetic_recommender(20, 3), 2)
    assert asyncio.run(_retry_backoff_of(worker, "t-0")) == 0.005
    assert sender.BACKOFF_OVERRIDE == 0.005

    monkeypatch.setenv("KSR_TXN_RETRY_BACKOFF_MS", "50")  # never raises aiokafka's 20 ms wait
    worker = Worker(Settings.from_env(), _synthetic_recommender(20, 3), 2)
    assert asyncio.run(_retry_backoff_of(worker, "t-0")) == 0.05
    assert sender.BACKOFF_OVERRIDE == 0.005

    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("KSR_TXN_RETRY_BACKOFF_MS", bad)
        with pytest.raises(ConfigError, match="KSR_TXN_RETRY_BACKOFF_MS must be a positive integer"):
            Settings.from_env()


async def _retry_backoff_of(worker, transactional_id: str) -> float:
    """The retry wait, in seconds, of a transactional producer built as Faust's
    begin_transaction builds it (constructed, never started)."""
    client = worker.app.producer._new_producer(transactional_id=transactional_id)
    return client._sender._retry_backoff


class StandInRecovery:
    """What watch_start reads of Faust's Recovery: `completed`, set at the first recovery's end,
    and the time of the last restored changelog batch."""

    def __init__(self) -> None:
        self.completed = asyncio.Event()
        self._last_active_event_processed_at: float | None = None


def test_a_start_that_stalls_restarts_the_worker_with_every_tasks_stack(monkeypatch, caplog) -> None:
    from worker import app

    restarts = []
    monkeypatch.setattr(app, "exit_for_restart", lambda what, with_traceback=True: restarts.append(what))

    async def run() -> None:
        await asyncio.wait_for(app.watch_start(StandInRecovery(), timeout=0.2, interval=0.02), 5)

    with caplog.at_level("ERROR"):
        asyncio.run(run())
    assert restarts == ["start stuck"]
    assert "has not started in 0.2 s, with nothing restored meanwhile (KSR_START_TIMEOUT_S)" in caplog.text
    assert " in watch_start" in caplog.text  # where each task waits


def test_a_start_that_ends_or_keeps_restoring_is_left_alone(monkeypatch) -> None:
    from worker import app

    restarts = []
    monkeypatch.setattr(app, "exit_for_restart", lambda what, with_traceback=True: restarts.append(what))

    async def run(restore_for: float) -> float:
        recovery = StandInRecovery()
        loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(app.watch_start(recovery, timeout=0.2, interval=0.02))
        started = loop.time()
        while loop.time() - started < restore_for:  # a long restore, batch after batch
            recovery._last_active_event_processed_at = loop.time()
            await asyncio.sleep(0.05)
        recovery.completed.set()
        await asyncio.wait_for(watcher, 5)
        await asyncio.sleep(0.3)  # nothing fires after the start
        return loop.time() - started

    assert asyncio.run(run(0.0)) < 1.0
    assert asyncio.run(run(0.8)) >= 0.8  # four timeouts long, never idle for one
    assert restarts == []


def test_the_start_timeout_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSR_START_TIMEOUT_S", raising=False)
    assert Settings.from_env().start_timeout_s == 120.0
    monkeypatch.setenv("KSR_START_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError, match="KSR_START_TIMEOUT_S must be a positive, finite number"):
        Settings.from_env()


def test_at_least_once_never_commits_past_a_send_that_failed(monkeypatch, caplog) -> None:
    """Under at-least-once the offsets commit after Faust's flush, which does not raise when a send
    failed: the worker checks every send since the last commit first, and restarts (so the events
    come again) rather than commit offsets whose answers or dead letters never reached the broker."""
    from types import SimpleNamespace

    from worker import app

    restarts = []
    monkeypatch.setattr(app, "exit_for_restart", lambda what, with_traceback=True: restarts.append(what))

    async def run(outcomes) -> list:
        loop = asyncio.get_running_loop()
        futures = []
        for outcome in outcomes:
            future = loop.create_future()
            future.set_exception(outcome) if isinstance(outcome, Exception) else future.set_result(outcome)
            futures.append(future)
        worker = SimpleNamespace(unconfirmed_sends=futures)
        await app.Worker._confirm_sends(worker)
        return worker.unconfirmed_sends

    assert asyncio.run(run(["metadata", "metadata"])) == [] and restarts == []
    with caplog.at_level("ERROR"):
        assert asyncio.run(run(["metadata", RuntimeError("TopicAuthorizationFailed")])) == []
    assert restarts == ["a send failed"]
    assert "1 sends failed" in caplog.text and "TopicAuthorizationFailed" in caplog.text


def test_users_are_counted_in_the_partitions_served_not_in_standby_copies() -> None:
    """Each worker keeps standby copies of other workers' partitions; their users are the other
    workers' to count, or a cluster's sum of ksr_users_in_state would count them twice."""
    from types import SimpleNamespace

    from faust.types import TP

    from worker import app

    stores = {0: "store-0", 1: "store-1", 2: "standby-2", 3: "standby-3"}
    worker = SimpleNamespace(
        user_state=SimpleNamespace(data=SimpleNamespace(_dbs=stores)),
        settings=SimpleNamespace(interactions_topic="interactions"),
        app=SimpleNamespace(assignor=SimpleNamespace(assigned_actives=lambda: {
            TP("interactions", 0), TP("interactions", 1), TP("ksr-users-changelog", 3)})),
    )
    assert app.Worker._active_stores(worker) == ["store-0", "store-1"]
