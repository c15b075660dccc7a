"""Direct delivery: the interactions topic's messages go from Faust's fetcher to the agent in whole
fetches, not one at a time through Faust's conductor, channel queue and stream.

Faust delivers every fetched message on its own: a coroutine through the conductor (a lock, the
flow-control and producer-buffer waits, an Event built around the message), a put into the agent's
channel queue, the stream iterator taking it out again (sensors, the current event, tracking), and
an acknowledgement per event. That machinery was a quarter of the event-loop thread's busy time at
saturation (README, Speed), while the agent works on whole batches anyway.

`DirectDelivery` replaces the consumer's fetch loop (`Consumer._drain_messages`, which Faust's
Fetcher service runs) with one that keeps Faust's consumer and its `getmany` (group membership,
rebalances, seeks, generations, flow control, read offsets and gaps stay Faust's), hands the
interactions topic's messages to the agent in bulk, and still passes every other topic's message
(table changelogs during recovery and for standbys) to Faust's own callback, one at a time as before.

What Faust's path guaranteed and this keeps:
- rebalances: the queue is cleared with Faust's channel queues (registered with the app's flow
  control), and no fetched message is queued while flow is suspended;
- in-flight batches: the messages the agent has taken are tracked as unacknowledged
  (`Consumer._unacked_messages`), so a revocation waits for their batch (`Consumer.wait_empty`),
  and acknowledged (`Consumer.ack`) after it, which is what Faust's commits count;
- back-pressure: the fetch loop stops when `max_queued` messages are waiting for the agent;
- the consumer-liveness check (`verify_event_path`) sees the partitions being processed.
Whether an event is processed, skipped as a redelivery or from an old generation, is decided by the
worker's ledger (worker.app.Worker._admit), as with Faust's path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator

from worker import metrics

log = logging.getLogger(__name__)


class DirectDelivery:
    """Queue between the consumer's fetch loop and the agent, for one topic."""

    def __init__(self, app, topic: str, max_queued: int = 4096) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.app = app
        self.topic = topic
        self.max_queued = max_queued
        # One queue per partition, in the order each was first fetched; `_queued` counts them all.
        self._queues: dict = {}
        self._queued = 0
        self._turn = 0  # which partition's share comes first in the next batch
        self._ready = asyncio.Event()  # something is queued
        self._room = asyncio.Event()  # fewer than max_queued are queued
        self._room.set()

    # -- the agent's side ----------------------------------------------------------------------

    async def batches(self, size: int) -> AsyncIterator[list]:
        """Whatever is queued, up to `size` messages at a time; waits only when nothing is.

        A batch takes an equal share of every partition with messages queued, then fills up from
        them in turn, each partition's messages in their order. A fetch returns partition by
        partition, so a batch taken in fetch order held one partition's events: with ml-100k's
        sessions, five or six users with dozens of events each, and the model's recurrence ran as
        many steps as the longest had events. Shares of several partitions hold more users with
        fewer events each (`ksr bench batches`), and no partition's backlog waits behind another's.
        """
        while True:
            while not self._queued:
                self._ready.clear()
                await self._ready.wait()
            batch = self._take(size)
            metrics.QUEUED_EVENTS.set(self._queued)
            if self._queued < self.max_queued:
                self._room.set()
            yield batch

    def _take(self, size: int) -> list:
        queues = [queue for queue in self._queues.values() if queue]
        turn = self._turn % len(queues)  # the partition that goes first takes turns
        self._turn += 1
        queues = queues[turn:] + queues[:turn]
        share = max(1, size // len(queues))
        batch: list = []
        for queue in queues:  # every partition's share, then whatever room is left, in turn
            n = min(share, len(queue), size - len(batch))
            batch.extend(queue.popleft() for _ in range(n))
        for queue in queues:
            n = min(len(queue), size - len(batch))
            batch.extend(queue.popleft() for _ in range(n))
        self._queued -= len(batch)
        return batch

    @property
    def queued(self) -> int:
        """Messages fetched and waiting for the agent."""
        return self._queued

    def take(self, messages: list) -> None:
        """The agent starts on `messages`: a revocation now waits for their acknowledgement."""
        self.app.consumer._unacked_messages.update(messages)
        inbound = self.app.monitor.stream_inbound_time
        now = time.monotonic()
        for tp in {message.tp for message in messages}:
            inbound[tp] = now

    def done(self, messages: list) -> None:
        """The agent is done with `messages` (processed or skipped): acknowledge them."""
        ack = self.app.consumer.ack
        for message in messages:
            ack(message)

    # -- Faust's side --------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop what is queued (the app's flow control calls this around a rebalance, as it clears
        Faust's channel queues); those messages are fetched again from the committed offsets."""
        self._queues.clear()
        self._queued = 0
        metrics.QUEUED_EVENTS.set(0)
        self._room.set()

    def put(self, messages: list) -> None:
        queues = self._queues
        for message in messages:
            queue = queues.get(message.tp)
            if queue is None:
                queue = queues[message.tp] = collections.deque()
            queue.append(message)
        self._queued += len(messages)
        metrics.QUEUED_EVENTS.set(self._queued)
        self._ready.set()
        if self._queued >= self.max_queued:
            self._room.clear()

    def install(self) -> None:
        """Take over the consumer's fetch loop (before Faust's Fetcher starts it, or restarts it
        after a rebalance); idempotent."""
        consumer = self.app.consumer
        if getattr(consumer, "_ksr_direct_delivery", None) is not None:
            return
        drainer = getattr(self.app._fetcher, "_drainer", None)
        if drainer is not None and not drainer.done():
            # Faust's own loop already runs and delivers to the (unread) stream; the ledger will see
            # the hole this leaves and restart the worker, which then installs this first.
            log.error("direct delivery installed after the fetch loop started")
        consumer._drain_messages = self._drain
        consumer._ksr_direct_delivery = self
        self.app.flow_control.manage_queue(self)

    async def _drain(self, fetcher) -> None:
        """Faust's Consumer._drain_messages (faust-streaming 0.15.3), with this topic's messages
        queued for the agent in bulk instead of passed to the conductor one by one."""
        consumer = self.app.consumer
        callback = consumer.callback
        getmany = consumer.getmany
        consumer_should_stop = consumer._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = consumer._read_offset.__getitem__
        set_read_offset = consumer._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        acquire_flow = self.app.flow_control.acquire
        commit_every = consumer._commit_every
        topic = self.topic
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                fetched = getmany(timeout=1.0)
                # As Faust: getmany can return at once many times in a row.
                await asyncio.sleep(0)
                if consumer.should_stop:
                    continue
                mine = []
                async for tp, message in fetched:
                    offset = message.offset
                    read = get_read_offset(tp)
                    if read is not None and offset < read:
                        continue  # already delivered (Faust drops these too)
                    if read and offset - read > 1 and acks_enabled_for(message.topic):
                        # Offsets with no message (transaction markers, compaction) count as
                        # acknowledged, so commits can pass them.
                        await consumer._add_gap(tp, read + 1, offset)
                    if commit_every is not None and consumer._n_acked >= commit_every:
                        consumer._n_acked = 0
                        await consumer.commit()
                    if message.topic == topic:
                        mine.append(message)
                    else:
                        await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if mine:
                    # Not while a rebalance has flow suspended; what was fetched before it is
                    # queued after it, and the ledger skips it as from an old generation.
                    await acquire_flow()
                    metrics.observe_ages(metrics.EVENT_AGE["fetched"], [message.timestamp for message in mine])
                    self.put(mine)
                    if not self._room.is_set():
                        await self._room.wait()
        except consumer.consumer_stopped_errors:
            if self.app.should_stop:
                log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.app.should_stop:
                log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception:
            log.exception("the fetch loop for %s failed", self.topic)
            raise
