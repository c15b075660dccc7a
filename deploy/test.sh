#!/usr/bin/env bash
# The test command: build or reuse the environment, start the local Kafka broker, fetch the data,
# lint, and run the whole suite against the real broker. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/bootstrap.sh
started_broker=0
if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ] && ! .venv/bin/ksr broker status >/dev/null 2>&1; then
  .venv/bin/ksr broker start
  started_broker=1
fi
stop_broker() { if [ "$started_broker" = 1 ]; then .venv/bin/ksr broker stop || true; fi; }
trap stop_broker EXIT

.venv/bin/ksr data fetch ml-100k >/dev/null
.venv/bin/ruff check model worker tests

set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "deploy/test.sh: pytest collected no tests; that is a failure" >&2
  rc=1
fi
exit "$rc"
