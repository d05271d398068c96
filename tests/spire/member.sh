#!/bin/sh
# Acts on one member of a real SPIRE fleet for the staged-upgrade tests, the
# way a systemd unit would: each member has a directory under FLEET holding
#   cmd       the command line that runs it (spire-server run … / spire-agent run …)
#   health    the command that says it is healthy (spire-* healthcheck -socketPath …)
#   version   the release it runs (what the plan's `version` template reads)
#   pid, log  while it runs
# The tests have one SPIRE release (1.13.3); an "upgrade" records the version
# it was asked for and restarts the same binary, so the datastore gates see
# what that release really does.
#
#   member.sh FLEET version|start|stop NAME
#   member.sh FLEET upgrade|rollback NAME VERSION
set -eu
fleet="$1" action="$2" name="$3"
dir="$fleet/$name"
[ -d "$dir" ] || { echo "member.sh: no member $name in $fleet" >&2; exit 2; }

running() { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }

start() {
  running && return 0
  # setsid: the member outlives the executor's shell, as a service would.
  setsid sh -c "exec $(cat "$dir/cmd")" >>"$dir/log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  i=0
  while [ $i -lt 240 ]; do
    if ! running; then
      echo "member.sh: $name exited at start; last lines of its log:" >&2
      tail -n 5 "$dir/log" >&2
      exit 1
    fi
    sh -c "$(cat "$dir/health")" >/dev/null 2>&1 && return 0
    sleep 0.25
    i=$((i + 1))
  done
  echo "member.sh: $name not healthy after 60 s" >&2
  exit 1
}

stop() {
  running || { rm -f "$dir/pid"; return 0; }
  pid="$(cat "$dir/pid")"
  kill -TERM "$pid" 2>/dev/null || true
  i=0
  while [ $i -lt 60 ] && kill -0 "$pid" 2>/dev/null; do sleep 0.25; i=$((i + 1)); done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "$action" in
  version) cat "$dir/version" ;;
  start) start ;;
  stop) stop ;;
  upgrade | rollback)
    echo "$4" >"$dir/version"
    stop
    start
    ;;
  *) echo "member.sh: unknown action $action" >&2; exit 2 ;;
esac
