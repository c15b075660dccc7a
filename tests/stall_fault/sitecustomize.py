"""A fault for test_reliability.py: a worker that stays in its group, with its partitions and its
fetches, and hands the agent no more events.

Python imports this module at start-up in every process that has this folder on PYTHONPATH. It acts
only in a Faust worker child (KSR_WORKER_CHILD=1) given KSR_TEST_STALL_MARKER, and only in the first
such child: that one creates the marker file, and the children its supervisor restarts find it and
run unchanged. In that first child, direct delivery (worker.delivery) queues the first
KSR_TEST_STALL_AFTER events for the agent and drops every later one, as if the fetch loop had
stopped delivering while the consumer kept fetching.
"""

import os


def _install() -> None:
    marker = os.environ.get("KSR_TEST_STALL_MARKER")
    if os.environ.get("KSR_WORKER_CHILD") != "1" or not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # a restarted child: no fault
    after = int(os.environ.get("KSR_TEST_STALL_AFTER", "300"))

    from worker import delivery

    put = delivery.DirectDelivery.put
    delivered = [0]

    def put_until_the_stall(self, messages) -> None:
        room = max(0, after - delivered[0])
        delivered[0] += len(messages)
        if room:
            put(self, messages[:room])

    delivery.DirectDelivery.put = put_until_the_stall


_install()
