"""What production does to a stream processor, on the real broker: nothing may be lost.

Each scenario lives in worker/faults.py (also `ksr bench faults --json`); these tests assert on it.
"""

from __future__ import annotations

import pytest

from worker import faults

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_worker_killed_mid_stream_answers_every_event_exactly_once(bootstrap, small_checkpoint) -> None:
    result = faults.crash(bootstrap, str(small_checkpoint), events=5000, rate=500, kill_after=4)
    assert result["events_sent"] == 5000
    assert 0 < result["answered_before_kill"] < 5000, "the kill must land mid-stream"
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["answered"] == 5000
    assert result["discarded_local_state"], "a crash must rebuild local state from the changelog"
    assert result["max_state_diff"] <= 1e-5, result


def test_at_least_once_worker_killed_mid_stream_loses_no_answer_and_applies_each_event_once(
        bootstrap, small_checkpoint) -> None:
    """KSR_PROCESSING_GUARANTEE=at_least_once: after a kill -9 the events since the last commit
    come again. Each is answered again (some may so be answered twice) and applied to its user's
    state once."""
    result = faults.crash(bootstrap, str(small_checkpoint), events=5000, rate=500, kill_after=4,
                          guarantee="at_least_once")
    assert result["events_sent"] == 5000
    assert 0 < result["answered_before_kill"] < 5000, "the kill must land mid-stream"
    assert result["lost"] == 0, result
    assert result["answered"] == 5000
    assert result["max_state_diff"] <= 1e-5, result


def test_at_least_once_applies_each_redelivered_event_once_beyond_the_recent_ids(
        bootstrap, small_checkpoint, monkeypatch) -> None:
    """The same crash keeping one recent event id per user: the kill lands in ml-100k sessions of
    dozens of events by one user, so a user gets several events again. Recognised by the id alone,
    all but the last were applied twice (README, Reliability); the last applied offset catches them."""
    monkeypatch.setenv("KSR_RECENT_EVENT_IDS", "1")
    result = faults.crash(bootstrap, str(small_checkpoint), events=5000, rate=500, kill_after=4,
                          guarantee="at_least_once")
    assert 0 < result["answered_before_kill"] < 5000, "the kill must land mid-stream"
    assert result["lost"] == 0 and result["answered"] == 5000, result
    assert result["max_state_diff"] <= 1e-5, result


def test_surviving_worker_takes_over_a_killed_workers_users_with_their_state(bootstrap, small_checkpoint) -> None:
    result = faults.scale_out(bootstrap, str(small_checkpoint), events=4000, rate=400, kill_after=5)
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["victim_answers_before_kill"] > 0, "the killed worker must have served some users"
    assert result["takeover_s"] is not None and result["takeover_s"] <= 60, result
    assert result["max_state_diff"] <= 1e-5, result


def test_worker_resumes_by_itself_after_a_broker_outage(bootstrap, small_checkpoint) -> None:
    from worker import broker

    if not broker.is_running():
        pytest.skip("needs the local broker managed by `ksr broker` (KAFKA_BOOTSTRAP_SERVERS is external)")
    result = faults.broker_outage(bootstrap, str(small_checkpoint), events=3000, rate=150, outage_s=30)
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["recovery_s"] is not None, result
    # Without worker.logfilter aiokafka's retry loops wrote 3,438 lines in this scenario (one run);
    # the worker passes one of each kind per 10 s.
    assert result["worker_log_lines"] < 1000, result


def test_worker_recovers_from_a_broker_outage_that_begins_during_its_start(bootstrap, small_checkpoint) -> None:
    """The broker goes away while the worker is still starting (its table recovery asks the broker
    where the changelog ends) and stays away longer than the client's request timeout. Faust's
    recovery swallowed the failure and never resumed the streams: the worker stayed up and answered
    nothing after the broker came back. Now it exits and its supervisor restarts it."""
    from worker import broker

    if not broker.is_running():
        pytest.skip("needs the local broker managed by `ksr broker` (KAFKA_BOOTSTRAP_SERVERS is external)")
    result = faults.broker_outage(bootstrap, str(small_checkpoint), events=1500, rate=150, stop_after=2.5,
                                  outage_s=90, timeout=240)
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["recovery_s"] is not None, result


def test_a_broker_outage_just_after_the_start_reads_the_changelog_ends_loses_nothing(
        bootstrap, small_checkpoint) -> None:
    """The broker is stopped for 90 s the moment the worker's table recovery has read where the
    changelog ends. Faust's recovery then waited for good, with no error: the worker stayed up,
    assigned and silent after the broker came back (two runs of two). With nothing restored for
    KSR_START_TIMEOUT_S (120 s) the worker now logs where its tasks wait and exits, and its
    supervisor restarts it: every event answered once."""
    from worker import broker

    if not broker.is_running():
        pytest.skip("needs the local broker managed by `ksr broker` (KAFKA_BOOTSTRAP_SERVERS is external)")
    result = faults.broker_outage(bootstrap, str(small_checkpoint), events=600, rate=150, stop_after=0.0,
                                  outage_s=90, timeout=240,
                                  stop_when_logged="Highwater for active changelog partitions")
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["recovery_s"] is not None, result


def test_a_broker_hung_longer_than_the_commit_timeout_restarts_the_worker_and_loses_nothing(
        bootstrap, small_checkpoint) -> None:
    """The broker's process is suspended for 45 s: its connections stay open and nothing answers,
    so the commit under way waits. Past KSR_COMMIT_TIMEOUT_S (here 15 s) the watchdog makes the
    worker exit for its supervisor. The restarted worker waits for the broker and goes on from the
    last commit: nothing lost, nothing answered twice."""
    from worker import broker

    if not broker.is_running():
        pytest.skip("needs the local broker managed by `ksr broker` (KAFKA_BOOTSTRAP_SERVERS is external)")
    result = faults.broker_outage(bootstrap, str(small_checkpoint), events=3000, rate=150, outage_s=45,
                                  stop_after=1.0, freeze=True, KSR_COMMIT_TIMEOUT_S="15")
    assert result["worker_restarts"] >= 1, f"no restart; the worker's log ends:\n{result.get('worker_log_tail')}"
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["recovery_s"] is not None, result


def test_hostile_payloads_are_each_answered_or_dead_lettered(bootstrap, small_checkpoint) -> None:
    result = faults.hostile_input(bootstrap, str(small_checkpoint), payloads=2000)
    assert result["worker_alive_at_end"], result
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["answered"] == result["valid"] > 0
    assert result["dead_lettered"] == 2000 - result["valid"]
    assert {"not_json", "oversized", "bad_ts", "unknown_item"} <= set(result["dead_letter_reasons"])



def test_a_worker_that_stops_taking_events_restarts_by_itself_and_loses_nothing(
        bootstrap, small_checkpoint) -> None:
    """A worker whose fetch path stops handing events to the agent keeps its group membership and
    its partitions: nothing else would ever take its events (one CI run saw a worker so for five
    minutes after a broker outage). tests/stall_fault makes the first worker process drop every
    event after its 300th (with the watchdog off, 900 of 1,200 events stayed unanswered: see
    docs/reliability.md); with KSR_STALL_TIMEOUT_S=10 the progress watchdog finds the input ahead
    of what was processed, logs where it stands, and restarts it. The restarted process (no fault)
    answers the rest: every event once."""
    result = faults.stalled_delivery(bootstrap, str(small_checkpoint), events=1200, rate=300, stall_after=300,
                                     stall_timeout_s=10)
    assert result["lost"] == 0 and result["duplicated"] == 0, result
    assert result["stall_restarts"] == 1 and result["worker_restarts"] == 1, result
    report = result["stall_report"]
    assert report.startswith("the worker has taken no event in 10 s while its input holds events it has not "
                             "processed (t"), report
    # Where the input stands, then the fetch path: nothing queued, nothing paused.
    assert ".interactions[" in report and " at offset " in report and "queued for the agent: 0; Faust's paused partitions: []" in report
    assert "; aiokafka: 0: position " in report and "highwater" in report and "unknown" not in report, report
