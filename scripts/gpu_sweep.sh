#!/usr/bin/env bash
# A sweep on a lent GPU machine whose calls end after at most 10 minutes while the machine stays up between them
# (the device tool: a process in its own session outlives the call that started it). How results/ was produced.
#
#   bash scripts/gpu_sweep.sh start CONFIG [zlt run flags]   copy this tree to $WORK/tree, start `zlt run` there,
#                                                            detached (setsid), with nvidia-smi sampled every 5 s
#   bash scripts/gpu_sweep.sh wait SECONDS                   follow the log until the run ends or SECONDS pass;
#                                                            exit 0 when it ended well, 1 failed, 2 still running
#   bash scripts/gpu_sweep.sh collect CONFIG OUT             `zlt export` + the log + GPU samples into OUT/results.tgz
#
# WORK (default /root/zlt-run) holds the tree, the artifacts (art/), the Dagster instance (dagster_home/), run.log,
# smi.csv and rc (the run's exit code once it ended). The environment (the kit's env.sh) must be sourced first.
set -euo pipefail
WORK=${WORK:-/root/zlt-run}
cmd=${1:?usage: gpu_sweep.sh start CONFIG [flags] | wait SECONDS | collect CONFIG OUT}; shift

case "$cmd" in
start)
  config=${1:?config}; shift
  mkdir -p "$WORK/art" "$WORK/dagster_home"
  rm -rf "$WORK/tree" "$WORK/rc"
  # a copy: the call's working tree is replaced by the next call's copy while the run still imports from it
  cp -r . "$WORK/tree"
  cd "$WORK/tree"
  pkill -f "nvidia-smi --query-gpu=timestamp" || true  # the sampler of an earlier start
  setsid nohup nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used,power.draw --format=csv \
    -l 5 > "$WORK/smi.csv" 2>/dev/null < /dev/null &
  # DAGSTER_HOME: the instance every worker shares (zlt writes its dagster.yaml there)
  setsid nohup bash -c "DAGSTER_HOME='$WORK/dagster_home' PYTHONPATH='$WORK/tree':\${PYTHONPATH:-} \
    python3 -m zlt_dagster.cli --artifacts '$WORK/art' run '$config' $* > '$WORK/run.log' 2>&1; \
    echo \$? > '$WORK/rc'" < /dev/null > /dev/null 2>&1 &
  echo "started: zlt run $config $* (log $WORK/run.log)"
  ;;
wait)
  limit=${1:?seconds}; t0=$SECONDS; shown=0
  while :; do
    lines=0; [ -f "$WORK/run.log" ] && lines=$(wc -l < "$WORK/run.log")
    if [ "$lines" -gt "$shown" ]; then sed -n "$((shown + 1)),${lines}p" "$WORK/run.log"; shown=$lines; fi
    if [ -f "$WORK/rc" ]; then
      sed -n "$((shown + 1)),\$p" "$WORK/run.log"
      rc=$(cat "$WORK/rc"); echo "zlt run ended with exit code $rc after $((SECONDS - t0)) s of this wait"
      [ "$rc" = 0 ] && exit 0 || exit 1
    fi
    [ $((SECONDS - t0)) -ge "$limit" ] && { echo "still running after $limit s"; exit 2; }
    sleep 5
  done
  ;;
collect)
  config=${1:?config}; out=${2:?out}
  rm -rf "$WORK/export"
  # a sweep without its report yet exports nothing: the log and the GPU samples still come back
  (cd "$WORK/tree" && DAGSTER_HOME="$WORK/dagster_home" PYTHONPATH="$WORK/tree:${PYTHONPATH:-}" \
    python3 -m zlt_dagster.cli --artifacts "$WORK/art" export "$config" "$WORK/export") || echo "export failed"
  mkdir -p "$WORK/export"
  cp "$WORK/run.log" "$WORK/smi.csv" "$WORK/export/" 2>/dev/null || true
  mkdir -p "$out"
  tar -czf "$out/results.tgz" -C "$WORK/export" .
  ls -la "$out/results.tgz"
  ;;
*) echo "unknown command $cmd" >&2; exit 64 ;;
esac
