#!/usr/bin/env bash
# Run the four stages in order, logging each one's start, end, duration and exit status.
# Started as "sh pipeline.sh" (dash, busybox), it runs itself again under bash, which it is written for.
if [ -z "${BASH_VERSION:-}" ]; then
  command -v bash >/dev/null 2>&1 && exec bash "$0" "$@"
  echo "pipeline: error: needs bash (run ./pipeline.sh or bash pipeline.sh)" >&2
  exit 2
fi
set -euo pipefail

# Written for Linux: bash 4.1 or newer, GNU coreutils (realpath -e, date +%N, sha256sum, mv -T) and util-linux's
# flock. Elsewhere (macOS: bash 3.2, BSD tools) one line names what is missing, before anything is touched.
missing=""
(( BASH_VERSINFO[0] > 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] >= 1) )) \
  || missing+="; bash 4.1 or newer (this is $BASH_VERSION)"
{ realpath -e / && [[ "$(date +%N)" =~ ^[0-9]+$ ]] && command -v sha256sum; } >/dev/null 2>&1 \
  || missing+="; GNU coreutils (realpath -e, date +%N, sha256sum, mv -T)"
command -v flock >/dev/null 2>&1 || missing+="; flock (util-linux)"
if [ -n "$missing" ]; then
  echo "pipeline: error: this system lacks ${missing#; }: pipeline.sh is written for Linux; on macOS, Homebrew's" \
    "bash, coreutils (first on PATH) and flock may serve (untested), or run the stages one by one in the order" \
    "of stages.txt (python data_creation.py, ...)" >&2
  exit 2
fi

# The project's folder is the script's own, wherever a link to it was called from (a link in ~/bin).
ROOT="$(cd "$(dirname "$(realpath -e -- "${BASH_SOURCE[0]}")")" && pwd)"
STAGES=()  # the one list of stages, in stages.txt (read by the benchmark and the tests too)
while read -r name _; do
  [ -n "$name" ] && [ "${name:0:1}" != "#" ] && STAGES+=("$name")
done < "$ROOT/stages.txt"
EXIT_BUSY=4

usage() {
  cat <<EOF
Usage: ./pipeline.sh [options]

Runs ${STAGES[*]} in order.

Options:
  --params FILE     parameters file passed to every stage (default: params.toml)
  --root DIR        project folder the stages read and write (data/, models/, reports/, logs/; it must
                    exist; default: this script's folder), so one copy of the code serves several projects
  --from STAGE      start at STAGE (its name, its script, or its number 1-4), reusing the artifacts of the
                    stages before it
  --force           run every stage, even those whose inputs, parameters and code are unchanged
  --wait SECONDS    if another run holds the lock, wait up to SECONDS (default: 0, exit at once)
  --setup-only      create .venv and install requirements.txt, then stop
  --debug           stages print full tracebacks on errors
  -h, --help        show this help

Interpreter: \$PYTHON if set, else .venv/bin/python (created with python3, or python,
and requirements.txt installed on first use). Logs go to logs/pipeline-<time>.log.
Exit status: that of the first failing stage (1 internal error, 2 bad input,
3 quality gate failed; 2 too if the parameters file changed during the run),
$EXIT_BUSY if another run holds the lock, 0 on success;
128+N when stopped by signal N (129 SIGHUP, 130 SIGINT/Ctrl-C, 143 SIGTERM: the
running stage stops cleanly, or is killed if it has not within \$PIPELINE_STOP_GRACE
seconds, default 30; 137 SIGKILL, e.g. the kernel out of memory).
EOF
}

die() { echo "pipeline: error: $*" >&2; exit 2; }
MAX_WAIT=604800  # a week: --wait beyond it is a typo

params="$ROOT/params.toml"
project="$ROOT"
from="${STAGES[0]}"
wait_seconds=0
setup_only=0
force=0
stage_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --params) [ $# -ge 2 ] || die "--params needs a file"; params="$2"; shift 2 ;;
    --root) [ $# -ge 2 ] || die "--root needs a folder"; project="$2"; shift 2 ;;
    --from) [ $# -ge 2 ] || die "--from needs a stage"; from="$2"; shift 2 ;;
    --wait) [ $# -ge 2 ] || die "--wait needs seconds"; wait_seconds="$2"; shift 2 ;;
    --setup-only) setup_only=1; shift ;;
    --force) force=1; shift ;;
    --debug) stage_flags+=(--debug); shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see ./pipeline.sh --help)" ;;
  esac
done
[[ "$wait_seconds" =~ ^[0-9]{1,7}$ ]] && [ "$((10#$wait_seconds))" -le "$MAX_WAIT" ] \
  || die "--wait takes whole seconds from 0 to $MAX_WAIT, got '$wait_seconds'"
wait_seconds=$((10#$wait_seconds))
# Seconds a signalled stage has to stop before it is killed (PIPELINE_STOP_GRACE; default 30).
STOP_GRACE="${PIPELINE_STOP_GRACE:-30}"
[[ "$STOP_GRACE" =~ ^[0-9]{1,5}$ ]] || die "PIPELINE_STOP_GRACE takes whole seconds, got '$STOP_GRACE'"
STOP_GRACE=$((10#$STOP_GRACE))
# Every stage reads the parameters file again, each with its own standard input: it must be a file on
# disk, found by its real path (/dev/stdin would be another stream in each stage).
[ -e "$params" ] || [ -L "$params" ] || die "parameters file not found: $params"
[ -d "$params" ] && die "--params $params is a folder, not a parameters file"
params_real="$(realpath -e -- "$params" 2>/dev/null)" \
  || die "--params $params is not a file on disk (a pipe, a link loop or a dangling link); give a TOML file"
[ -f "$params_real" ] || die "--params $params is not a regular file (a FIFO, device or terminal); give a TOML file"
params="$params_real"
project_real="$(realpath -e -- "$project" 2>/dev/null)" && [ -d "$project_real" ] \
  || die "--root $project: folder not found (a stage never creates its project folder: make it)"
project="$project_real"
start_index=-1
from="${from%.py}"  # the script's name names its stage too
for i in "${!STAGES[@]}"; do [ "${STAGES[$i]}" = "$from" ] || [ "$((i + 1))" = "$from" ] && start_index=$i; done
[ "$start_index" -ge 0 ] || die "unknown stage '$from'; stages are: ${STAGES[*]}"

# The interpreter: $PYTHON as given, else the project's .venv, made on first use.
# A marker holding the hash of requirements.txt tells whether the install finished
# and is current, so an interrupted install is redone rather than trusted.
setup_venv() {
  local venv="$ROOT/.venv" marker="$ROOT/.venv/.requirements.sha256" want base aside
  want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$marker" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  base="$(command -v python3 || command -v python || true)"
  [ -n "$base" ] || die "no python3 or python on PATH; install Python 3.11 or newer"
  "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$base" --version 2>&1) is too old; Python 3.11 or newer is required"
  # A .venv whose Python no longer runs (the Python it was made from removed or upgraded) is moved aside, never
  # deleted: it may hold what its owner installed.
  if { [ -e "$venv" ] || [ -L "$venv" ]; } && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    aside="$venv.broken-$(date +%Y%m%d-%H%M%S)-$$"
    mv -T -- "$venv" "$aside" || die "$venv's Python does not run, and it could not be moved aside; delete $venv"
    echo "pipeline: .venv's Python does not run (the Python it was made from was removed or upgraded): moved it" \
      "aside to $(basename "$aside") (delete it when you like); making a new one" >&2
  fi
  echo "pipeline: installing requirements.txt into .venv (once)" >&2
  [ -x "$venv/bin/python" ] || "$base" -m venv "$venv" \
    || die "could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt" \
    || die "pip could not install requirements.txt (see the messages above)"
  echo "$want" > "$marker"
}

if [ -n "${PYTHON:-}" ]; then
  command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an executable"
  py="$PYTHON"
  # Found, not imported: importing the six would cost every run, a no-op too, more than a second.
  problem="$("$py" -c '
import sys
if sys.version_info < (3, 11):
    print("is Python %d.%d; 3.11 or newer is required" % sys.version_info[:2]); raise SystemExit
from importlib.util import find_spec
missing = [name for name in ("numpy", "pandas", "sklearn", "joblib", "matplotlib", "pyarrow") if find_spec(name) is None]
if missing:
    print("lacks " + ", ".join(missing) + "; install requirements.txt into it, or unset PYTHON to use .venv")
' 2>&1 | tail -n 1)" || problem="does not run"
  [ -z "$problem" ] || die "PYTHON=$PYTHON $problem"
else
  # .venv holds everything the stages import. A PYTHONPATH or PYTHONHOME set for other work (a cluster's module
  # system, another Python's packages) would put other copies of numpy or pandas, or another Python's standard
  # library, before it: the stages would fail to import, and a .venv that runs would look broken.
  for variable in PYTHONPATH PYTHONHOME; do
    if [ -n "${!variable:-}" ]; then
      echo "pipeline: $variable=${!variable} is ignored: .venv holds what the stages import (set PYTHON to run" \
        "them with a Python of your own, which keeps it)" >&2
    fi
    unset "$variable"
  done
  setup_venv
  py="$ROOT/.venv/bin/python"
fi
[ "$setup_only" = 1 ] && exit 0

# The pipeline's questions to the project (is the layout safe, is a stage up to date), from the project's
# folder so that its package is the one imported.
ask() { (cd "$ROOT" && "$py" -m station_forecast.cli "$@"); }
# The folders the pipeline writes must be its own: a link there would carry its writes and deletes elsewhere.
ask layout --root "$project" || exit $?
mkdir -p "$project/logs"
log_file="$project/logs/pipeline-$(date +%Y%m%d-%H%M%S)-$$.log"
if [ -e "$log_file" ] || [ -L "$log_file" ]; then die "$log_file already exists; a run's log is never written twice"; fi
say() { printf '%s %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" | tee -a "$log_file"; }

# One run at a time per project folder. flock's lock belongs to this process's
# open file, so the kernel releases it however the run ends (SIGKILL included):
# a killed run never leaves a stale lock behind.
lock_file="$project/logs/.pipeline.lock"
exec 9>>"$lock_file"
pid_file="$project/logs/.pipeline.pid"
if ! flock -n 9; then
  holder=""
  [ -f "$pid_file" ] && [ ! -L "$pid_file" ] && holder="$(head -c 20 "$pid_file" | tr -cd '0-9' || true)"
  busy="another run (pid ${holder:-unknown}) is using $project"
  if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null; then
    busy+=" (that process has ended; a stage it started is still stopping)"
  fi
  if [ "$wait_seconds" -eq 0 ]; then
    echo "pipeline: $busy; retry later or pass --wait SECONDS" >&2
    exit "$EXIT_BUSY"
  fi
  echo "pipeline: $busy; waiting up to ${wait_seconds}s for it" >&2
  if ! flock -w "$wait_seconds" 9; then
    echo "pipeline: gave up after ${wait_seconds}s; $lock_file is still held (pid ${holder:-unknown})" >&2
    exit "$EXIT_BUSY"
  fi
fi
# A new file renamed over the old: a link planted there is replaced, never written through.
echo "$$" > "$pid_file.$$" && mv -fT "$pid_file.$$" "$pid_file"
export PIPELINE_LOCK_FD=9  # the stages inherit this locked descriptor instead of taking the lock again
export PIPELINE_PID=$$     # and stop when this process ends, however it ends

# A signal to this script (the pid the busy message names) reaches the running stage, which stops
# cleanly; the pipeline waits for it, then ends.
ran=()  # the stages this run ran to the end (skipped ones, up to date, are not among them)
outcome() {
  if [ "${#ran[@]}" -eq 0 ]; then
    echo "no stage of this run replaced its outputs; the manifest still describes the earlier runs' artifacts. Log: $log_file"
  else
    echo "stages that ran and replaced their outputs: ${ran[*]}; later stages' artifacts are from earlier runs and the manifest makes the next stage refuse the mix. Log: $log_file"
  fi
}
child="" child_stage=""
elapsed() {  # seconds since the running stage started, to a tenth
  awk -v a="$stage_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}
stop() {
  local signal_name="$1" code="$2"
  # The signal may come outside the main loop's `set +e` window; the stopped stage's non-zero status
  # must not end this handler before it has said what happened.
  set +e
  trap '' TERM INT HUP  # one stop at a time
  end_ahead
  if [ -n "$child" ]; then
    kill -s "$signal_name" "$child" 2>/dev/null
    # A stage stops within seconds. One the signal caught between this script's fork and its exec (which
    # swallows it) could wait forever: after the grace, it is killed.
    end_within "$STOP_GRACE" "$child" \
      || say "stage $child_stage: did not stop within ${STOP_GRACE}s of SIG$signal_name; killed (SIGKILL)"
    wait "$child" 2>/dev/null
    local status=$?
    end_within 5 "${tees[@]}"  # its last words reach the terminal and the log before these lines
    say "stage $child_stage: end, $(elapsed)s, exit $status"
    [ "$status" -eq 0 ] && ran+=("$child_stage")  # it may have finished before the signal reached it
  fi
  say "pipeline: stopped by SIG$signal_name; $(outcome)"
  exit "$code"
}
end_within() {  # $1 seconds, then pids: wait until they have ended, at most that long; then SIGKILL the rest
  local limit="$1" tick pid; shift
  for ((tick = 0; tick < limit * 10; tick++)); do
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && break; pid=""; done
    [ -z "$pid" ] && return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null
  return 1
}
declare -A STOP_NAMES=([129]=HUP [130]=INT [143]=TERM)  # 128 + the signal's number
for code in "${!STOP_NAMES[@]}"; do
  trap "stop ${STOP_NAMES[$code]} $code" "${STOP_NAMES[$code]}"
done

say "pipeline: start (python $("$py" -c 'import platform; print(platform.python_version())'), params $params, log $log_file)"
# The stages' FIFOs live in the project's logs/, one folder per run; a run killed outright (SIGKILL) leaves
# its folder, which the next run removes once that run's process is gone.
for old in "$project"/logs/.fifos-*; do
  if [ -d "$old" ] && [ ! -L "$old" ] && ! kill -0 "${old##*-}" 2>/dev/null; then rm -rf -- "$old"; fi
done
fifos="$project/logs/.fifos-$$"
rm -rf -- "$fifos" && mkdir -m 700 "$fifos" || die "cannot make $fifos"
# A signal between starting a stage's copies and the stage itself leaves copies waiting to open a FIFO no
# stage will write: they would hold the terminal's output open after this script ends. Every child still
# running at the end (each stage has been waited for by then) is one of those, or a stage started ahead
# that a signal caught before its pid was recorded. They are waited for: each holds the project's lock,
# and the next run must find it free once this script has ended.
trap 'kill -KILL $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf -- "$fifos"' EXIT

# Each stage's interpreter is started while the stage before it works: it imports what its stage needs
# (--wait-for-go) and waits for a line on its FIFO, "go" to run or "skip" to end, so the imports (most
# of a stage's time at the default size) overlap the work before them and two processes share the
# machine's CPUs at most. ahead_*: the stage started ahead, its pid, the write end of its FIFO and the
# two tee processes copying its stdout and stderr to the terminal and the log.
ahead="" ahead_pid="" ahead_go="" ahead_tees=()
start_ahead() {
  local stage="$1"
  mkfifo "$fifos/go-$stage" "$fifos/out-$stage" "$fifos/err-$stage"
  exec {ahead_go}<>"$fifos/go-$stage"  # read and write: neither this open nor a later write can block
  # Only this script holds the FIFO's write end (the children close it), so if it dies, even by
  # SIGKILL, the waiting stage reads the end of its input and ends.
  # The copies outlive a signal to the process group (Ctrl-C, a closed terminal): they end when the stage
  # closes its output, so its last words (why it stopped) still reach the terminal and the log.
  (trap '' INT HUP TERM; exec tee -a "$log_file") < "$fifos/out-$stage" {ahead_go}>&- & ahead_tees=($!)
  (trap '' INT HUP TERM; exec tee -a "$log_file" >&2) < "$fifos/err-$stage" {ahead_go}>&- & ahead_tees+=($!)
  "$py" "$ROOT/$stage.py" --params "$params" --root "$project" "${stage_flags[@]}" --wait-for-go \
    < "$fifos/go-$stage" > "$fifos/out-$stage" 2> "$fifos/err-$stage" {ahead_go}>&- &
  ahead="$stage" ahead_pid=$!
}
tell_ahead() {  # $1: go or skip
  echo "$1" >&"$ahead_go"
  exec {ahead_go}>&-
  ahead=""
}
end_ahead() {  # a stage started ahead that will not run: it has only imported, so it is simply ended
  [ -n "$ahead" ] || return 0
  local pid="$ahead_pid"
  tell_ahead skip
  # Killed, not asked: a signal that came between this script's fork of it (or of its copies) and the exec
  # is swallowed, and the fork then waits forever to open its FIFO.
  kill -KILL "$pid" "${ahead_tees[@]}" 2>/dev/null
  wait "$pid" "${ahead_tees[@]}" 2>/dev/null || true
}

pipeline_start=$(date +%s.%N)
# Each stage reads the parameters file when it starts. Edited during the run, the stages after the edit would
# read other parameters than those before it, and the run would end "done" with outputs no one parameters file
# made: the run stops at the next stage instead (the next run remakes what the change touches).
params_digest() { sha256sum 2>/dev/null < "$params" | cut -d' ' -f1 || true; }
params_at_start="$(params_digest)"
params_unchanged() {  # $1: where the run is
  [ "$(params_digest)" = "$params_at_start" ] && return 0
  end_ahead
  say "pipeline: STOPPED $1: $params changed (or went) during this run, so the stages after the change would read other parameters than the stages before it; run ./pipeline.sh again: it reruns the stages whose parameters changed; $(outcome)"
  exit 2
}
# --from reuses the artifacts of the stages before it as they are: say so where they no longer match the
# parameters, code or inputs (the later stages would otherwise call themselves up to date on top of them).
for stage in "${STAGES[@]:0:$start_index}"; do
  if ! verdict="$(ask "$stage" --params "$params" --root "$project" 2>&1)"; then
    say "pipeline: warning: $stage is not up to date (${verdict#*: runs (}; --from ${STAGES[$start_index]} reuses its artifacts as they are: run from $stage to remake them"
  fi
done
run_stages=("${STAGES[@]:$start_index}")
for i in "${!run_stages[@]}"; do
  stage="${run_stages[$i]}"
  params_unchanged "before stage $stage"
  # A stage whose parameters, code, inputs and outputs are as the manifest recorded them is skipped.
  if [ "$force" = 0 ] && verdict="$(ask "$stage" --params "$params" --root "$project" 2>&1)"; then
    say "$verdict"
    end_ahead
    continue
  fi
  say "stage $stage: start${verdict:+ (${verdict#*: runs (}}"
  stage_start=$(date +%s.%N)
  [ "$ahead" = "$stage" ] || start_ahead "$stage"
  # The stage runs in the background, so a signal to this script can be passed on to it. From this line on
  # it is the running stage, not one started ahead: a signal that comes before it is told to go must stop
  # it as a stage (it ends with the signal's code), not kill it as a stage that will not run (137).
  child="$ahead_pid" child_stage="$stage" tees=("${ahead_tees[@]}") ahead=""
  tell_ahead go
  if [ $((i + 1)) -lt "${#run_stages[@]}" ]; then
    start_ahead "${run_stages[$((i + 1))]}"
  fi
  set +e
  wait "$child"
  status=$?
  set -e
  child=""
  wait "${tees[@]}" || true
  say "stage $stage: end, $(elapsed)s, exit $status"
  if [ "$status" -ne 0 ]; then
    end_ahead
    # A stage stopped by a signal this script did not see (bash passes over a Ctrl-C that reaches it while a
    # short command of its own, such as `date`, runs and ends normally) is a stop, not a failure.
    case "$status" in
      129|130|143) say "pipeline: stopped by SIG${STOP_NAMES[$status]}; $(outcome)" ;;
      *) say "pipeline: FAILED at stage $stage (exit $status); $(outcome)" ;;
    esac
    exit "$status"
  fi
  ran+=("$stage")
done
params_unchanged "after the last stage"
total=$(awk -v a="$pipeline_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
say "pipeline: done in ${total}s. Metrics: $project/models/metrics.json"
