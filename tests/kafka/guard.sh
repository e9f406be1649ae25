#!/usr/bin/env bash
# guard.sh OWNER_PID SCRATCH_DIR -- COMMAND...
#
# Runs COMMAND (the test broker) as long as process OWNER_PID (the test binary) lives,
# then stops it and removes SCRATCH_DIR. The Rust test harness has no global teardown
# and never drops a static, so the broker's lifetime is tied to the process here:
#   - the owner is polled every 0.5 s (pid and start time, so a reused pid is not mistaken
#     for it);
#   - SIGTERM/SIGINT/SIGHUP (the test binary sets PR_SET_PDEATHSIG=SIGTERM on this
#     script) stop it at once;
#   - COMMAND gets PR_SET_PDEATHSIG=SIGKILL through setpriv, so it dies even if this
#     script is killed with SIGKILL (the scratch dir is then left for the next run's
#     stale-dir sweep).
# If COMMAND exits on its own, its exit status is written to SCRATCH_DIR/exit-status and
# the scratch dir (with its log) stays until the owner is gone, so the test can report why.
set -uo pipefail

if [[ $# -lt 4 || "$3" != "--" ]]; then
    echo "usage: guard.sh OWNER_PID SCRATCH_DIR -- COMMAND..." >&2
    exit 2
fi
owner="$1"
scratch="$2"
shift 3

# Field 22 of /proc/PID/stat, counted after the parenthesised command name, which may
# contain spaces.
start_time() {
    local stat rest
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    rest="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $rest
    echo "${20}"
}

owner_start="$(start_time "$owner")" || exit 0

if command -v setpriv >/dev/null; then
    setpriv --pdeathsig KILL -- "$@" &
else
    "$@" &
fi
child=$!

stopping=""
stop() {
    [[ -n "$stopping" ]] && return
    stopping=1
    if [[ -n "$child" ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null
        # A broker that has not stopped within 5 s is killed: its data is thrown away.
        for _ in $(seq 1 50); do
            kill -0 "$child" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$child" 2>/dev/null
    fi
    [[ -n "$child" ]] && wait "$child" 2>/dev/null
    rm -rf -- "$scratch"
    exit 0
}
trap stop TERM INT HUP

while [[ "$(start_time "$owner")" == "$owner_start" ]]; do
    if [[ -n "$child" ]] && ! kill -0 "$child" 2>/dev/null; then
        wait "$child"
        echo "$?" >"$scratch/exit-status"
        child=""
    fi
    sleep 0.5 &
    # `wait` returns as soon as a trapped signal arrives; a foreground sleep would not.
    wait $! 2>/dev/null
done
stop
