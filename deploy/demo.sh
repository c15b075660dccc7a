#!/usr/bin/env bash
# The main job, end to end on this machine: environment, local Kafka broker, ml-100k, a checkpoint
# (trained once, then reused), the worker, a replay of real events, recommendations and metrics.
#   bash deploy/demo.sh          run it (the broker and the worker keep running afterwards)
#   bash deploy/demo.sh stop     stop the worker and the broker
# Knobs: KSR_DEMO_EVENTS (5000), KSR_DEMO_RATE (events/s, default 1000), KSR_DEMO_TRAIN_MINUTES (10).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
demo="$root/var/demo"
mkdir -p "$demo"
pidfile="$demo/worker.pid"

stop_worker() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"
    for _ in $(seq 30); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$pidfile"
}

if [ "${1:-}" = "stop" ]; then
  stop_worker
  [ -x .venv/bin/ksr ] && .venv/bin/ksr broker stop
  exit 0
fi

bash deploy/bootstrap.sh
ksr=.venv/bin/ksr
$ksr broker start
$ksr data fetch ml-100k >/dev/null

export KSR_CHECKPOINT=${KSR_CHECKPOINT:-$root/var/checkpoints/current}
if [ ! -f "$KSR_CHECKPOINT/meta.json" ]; then
  echo "demo: training KSR on ml-100k (once; capped at ${KSR_DEMO_TRAIN_MINUTES:-10} min) -> $KSR_CHECKPOINT" >&2
  $ksr train --data ml-100k --out "$KSR_CHECKPOINT" --max-minutes "${KSR_DEMO_TRAIN_MINUTES:-10}" --json
else
  echo "demo: reusing the checkpoint at $KSR_CHECKPOINT" >&2
fi

stop_worker
export KSR_METRICS_PORT=${KSR_METRICS_PORT:-9464}
echo "demo: starting the worker (log: $demo/worker.log)" >&2
nohup $ksr worker --loglevel info >"$demo/worker.log" 2>&1 &
echo $! >"$pidfile"
# Wait for the metrics page and for Faust to finish its start (group join, table recovery):
# events replayed before that wait in Kafka, and the latency metric printed below would count it.
for _ in $(seq 180); do
  curl -sf "http://127.0.0.1:$KSR_METRICS_PORT/metrics" >/dev/null &&
    grep -qF "[^Worker]: Ready" "$demo/worker.log" && break
  kill -0 "$(cat "$pidfile")" 2>/dev/null || { tail -20 "$demo/worker.log"; exit 1; }
  sleep 1
done

events=${KSR_DEMO_EVENTS:-5000}
# Each run replays the next slice of the data set: replaying the same event ids again would be
# recognised as duplicates and change nothing.
cursor=$(cat "$demo/replay.cursor" 2>/dev/null || echo 0)
[ "$((cursor + events))" -le 100000 ] || cursor=0
processed() {
  curl -s "http://127.0.0.1:$KSR_METRICS_PORT/metrics" | awk '/^ksr_events_total/ {n += $2} END {print int(n)}'
}
target=$(( $(processed) + events ))
echo "demo: replaying ml-100k events $cursor..$((cursor + events - 1)) into the interactions topic" >&2
$ksr replay --data ml-100k --skip "$cursor" --limit "$((cursor + events))" --rate "${KSR_DEMO_RATE:-1000}"
echo "$((cursor + events))" >"$demo/replay.cursor"
for _ in $(seq 120); do
  [ "$(processed)" -ge "$target" ] && break
  sleep 1
done

echo
echo "Latest recommendations (topic: recommendations):"
$ksr tail -n 5
# The state gauges are sampled every 10 s: wait (at most 12 s) for a sample taken after the events.
for _ in $(seq 12); do
  curl -s "http://127.0.0.1:$KSR_METRICS_PORT/metrics" | awk '/^ksr_users_in_state / && $2 > 0 {f = 1} END {exit !f}' && break
  sleep 1
done
echo
echo "Metrics: http://127.0.0.1:$KSR_METRICS_PORT/metrics"
curl -s "http://127.0.0.1:$KSR_METRICS_PORT/metrics" | grep -E '^ksr_(events_total|recommendations_total|users_in_state|model_version|event_to_recommendation_seconds_(count|sum))\b'
echo
echo "The worker (pid $(cat "$pidfile")) and the broker keep running; stop both with: bash deploy/demo.sh stop"
