#!/usr/bin/env bash
# fleet.sh: start, stop, version, upgrade and roll back spire-standin fleet
# members, for spirekeep's "command" executor. See tests/standin/README.md.
#
#   fleet.sh start    NAME            start in the background, wait for /live
#   fleet.sh stop     NAME            SIGTERM, wait, SIGKILL after a timeout
#   fleet.sh status   NAME            exit 0 running, 3 stopped
#   fleet.sh version  NAME            print the version the member's binary reports
#   fleet.sh upgrade  NAME VERSION    install VERSION (not older), restart if running
#   fleet.sh rollback NAME VERSION    install VERSION (not newer), restart if running
#   fleet.sh clock    NAME            print the member host's clock (Unix seconds)
#
# Environment:
#   STANDIN_FLEET_DIR       (required) the fleet directory; NAME is <dir>/<NAME>/
#   SPIRE_STANDIN_BIN       the spire-standin binary (default: spire-standin on PATH)
#   STANDIN_START_TIMEOUT   seconds start waits for /live (default 30)
#   STANDIN_STOP_TIMEOUT    seconds stop waits after SIGTERM before SIGKILL (default 10)
#
# A member directory holds: version, role (server|agent), args (the rest of
# the command line, ONE ARGUMENT PER LINE), and, written here, pid and log.
# A file clock-offset (seconds, may be negative) makes `clock` report a host
# whose clock is off by that much.
#
# Exit status: 0 done; 1 the action failed (the log tail is on stderr);
# 2 usage error; 3 (status only) not running.
set -uo pipefail

prog="fleet.sh"
usage() {
  sed -n '4,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "$prog: $*" >&2
  exit 1
}

[ $# -ge 2 ] || usage
cmd="$1"
name="$2"
target="${3:-}"
[ -n "${STANDIN_FLEET_DIR:-}" ] || { echo "$prog: STANDIN_FLEET_DIR is not set" >&2; exit 2; }
case "$name" in "" | . | .. | */*) echo "$prog: bad member name '$name'" >&2; exit 2 ;; esac
[ -d "$STANDIN_FLEET_DIR/$name" ] || die "no member '$name' in $STANDIN_FLEET_DIR"
dir="$(cd "$STANDIN_FLEET_DIR/$name" && pwd)"

if [ -n "${SPIRE_STANDIN_BIN:-}" ]; then
  bin="$SPIRE_STANDIN_BIN"
else
  bin="$(command -v spire-standin || true)"
fi
[ -n "$bin" ] && [ -x "$bin" ] || die "spire-standin not found: set SPIRE_STANDIN_BIN"
# Absolute, because members start in their own directory.
case "$bin" in /*) ;; *) bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")" ;; esac

start_timeout="${STANDIN_START_TIMEOUT:-30}"
stop_timeout="${STANDIN_STOP_TIMEOUT:-10}"

# One action per member at a time. fd 9 is closed for the member's process.
exec 9>"$dir/.lock"
flock 9 || die "cannot lock $dir/.lock"

# Whether PID is a live (not zombie) process.
alive() {
  local pid="$1" state
  [ -r "/proc/$pid/stat" ] || return 1
  state="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
  [ -n "$state" ] && [ "$state" != "Z" ] && [ "$state" != "X" ]
}

# Prints the member's pid if it is running (and really is this member: the
# pid file may be stale and the pid reused).
running_pid() {
  local pid
  [ -f "$dir/pid" ] || return 1
  pid="$(tr -dc '0-9' <"$dir/pid")"
  [ -n "$pid" ] || return 1
  alive "$pid" || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$dir" || return 1
  echo "$pid"
}

installed_version() {
  if [ -f "$dir/version" ]; then tr -d '[:space:]' <"$dir/version"; fi
}

print_log_tail() {
  local from="$1"
  echo "---- $name log (this start) ----" >&2
  tail -c +"$from" "$dir/log" 2>/dev/null | tail -n 40 >&2
  echo "---- end of log ----" >&2
}

do_start() {
  local pid role listen line i from deadline rc
  local -a args=()
  if pid="$(running_pid)"; then
    echo "$name: already running (pid $pid, version $(installed_version))"
    return 0
  fi
  rm -f "$dir/pid"
  [ -f "$dir/role" ] || die "$name: no role file (server or agent)"
  role="$(tr -d '[:space:]' <"$dir/role")"
  case "$role" in server | agent) ;; *) die "$name: role is '$role', not server or agent" ;; esac
  [ -f "$dir/version" ] || die "$name: no version file: nothing is installed"
  [ -f "$dir/args" ] || die "$name: no args file"
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in "" | "#"*) continue ;; esac
    args+=("$line")
  done <"$dir/args"
  listen=""
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
      --listen) listen="${args[$((i + 1))]:-}" ;;
      --listen=*) listen="${args[$i]#--listen=}" ;;
    esac
  done
  [ -n "$listen" ] || die "$name: args has no --listen (one argument per line: --listen, then 127.0.0.1:PORT)"

  touch "$dir/log"
  from=$(($(stat -c %s "$dir/log") + 1))
  echo "---- fleet.sh: starting $name ($role $(installed_version)) at $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$dir/log"
  # New session, stdio to the log, working directory = the member directory
  # (relative SQLite paths resolve there, as SPIRE resolves them against its
  # working directory). exec keeps the pid: setsid does not fork when its
  # caller is not a process-group leader.
  (cd "$dir" && exec setsid "$bin" "$role" --state-dir "$dir" "${args[@]}" </dev/null >>"$dir/log" 2>&1 9>&-) &
  pid=$!
  echo "$pid" >"$dir/pid"

  deadline=$((SECONDS + start_timeout))
  while :; do
    if ! alive "$pid"; then
      wait "$pid"
      rc=$?
      rm -f "$dir/pid"
      echo "$name: exited with status $rc while starting" >&2
      print_log_tail "$from"
      return 1
    fi
    if "$bin" healthcheck --url "http://$listen/live" >/dev/null 2>&1; then
      echo "$name: started (pid $pid, $role $(installed_version), http://$listen)"
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$name: /live did not answer 200 within ${start_timeout}s; killing pid $pid" >&2
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      rm -f "$dir/pid"
      print_log_tail "$from"
      return 1
    fi
    sleep 0.2
  done
}

do_stop() {
  local pid i
  if ! pid="$(running_pid)"; then
    rm -f "$dir/pid"
    echo "$name: not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < stop_timeout * 10; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    echo "$name: still running ${stop_timeout}s after SIGTERM; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    alive "$pid" && die "$name: pid $pid survived SIGKILL"
  fi
  rm -f "$dir/pid"
  echo "$name: stopped (pid $pid)"
}

# Whether version $1 sorts strictly before $2.
older() {
  [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$1" ]
}

do_install() {
  local direction="$1" current was_running=0
  [[ "$target" =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] ||
    { echo "$prog: $direction $name VERSION: '$target' is not a version like 1.14.7" >&2; exit 2; }
  current="$(installed_version)"
  if [ -n "$current" ]; then
    if [ "$direction" = upgrade ] && older "$target" "$current"; then
      die "upgrade $name $target: $target is older than the installed $current; use rollback"
    fi
    if [ "$direction" = rollback ] && older "$current" "$target"; then
      die "rollback $name $target: $target is newer than the installed $current; use upgrade"
    fi
  fi
  if running_pid >/dev/null; then
    was_running=1
    do_stop || return 1
  fi
  printf '%s\n' "$target" >"$dir/version.tmp" && mv -f "$dir/version.tmp" "$dir/version" ||
    die "$name: cannot write $dir/version"
  echo "$name: installed $target (was ${current:-nothing})"
  if [ "$was_running" = 1 ]; then
    do_start
  fi
}

case "$cmd" in
  start) [ $# -eq 2 ] || usage; do_start ;;
  stop) [ $# -eq 2 ] || usage; do_stop ;;
  status)
    [ $# -eq 2 ] || usage
    if pid="$(running_pid)"; then
      echo "$name: running (pid $pid, version $(installed_version))"
    else
      echo "$name: stopped"
      exit 3
    fi
    ;;
  version)
    [ $# -eq 2 ] || usage
    # Like `spire-server --version`, the binary prints on stderr; pass it on stdout.
    "$bin" version --state-dir "$dir" 2>&1
    ;;
  upgrade | rollback) [ $# -eq 3 ] || usage; do_install "$cmd" ;;
  clock)
    [ $# -eq 2 ] || usage
    offset=0
    if [ -f "$dir/clock-offset" ]; then offset="$(tr -dc '0-9-' <"$dir/clock-offset")"; fi
    echo $(($(date +%s) + ${offset:-0}))
    ;;
  *) usage ;;
esac
