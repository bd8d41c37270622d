#!/usr/bin/env bash
# From a fresh clone to a result in one command. Sets up the virtual environment when it is missing, or when
# requirements.txt changed since it was installed (otherwise it takes a second), then:
#   bash run.sh demo [demo.sh arguments...]   the offline demo (training_script/demo.sh)
#   bash run.sh tests [pytest arguments...]   the linters, then the full test suite (what CI runs)
#   bash run.sh quick                         the linters, then the quick test subset (no slow or multi-process runs)
#   bash run.sh setup                         only the set-up
# Environment: VENV (default .venv), PYTHON (the interpreter that makes it, default python3).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
REQUIREMENTS=${REQUIREMENTS:-requirements.txt}

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# set_up: the venv exists and holds exactly what requirements.txt pins (its hash is kept next to the venv's files,
# written only after an install succeeded, so a failed install is retried next time)
set_up() {
  local stamp="$VENV/requirements.sha256" want
  want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
  if [[ ! -x $VENV/bin/python ]]; then
    echo "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "installing $REQUIREMENTS into $VENV (the first time takes a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
    echo "$want" > "$stamp"
  fi
  # shellcheck disable=SC1091 # made above
  . "$VENV/bin/activate"
}

lint() {
  ruff check .
  shellcheck training_script/*.sh training_script/*.sbatch run.sh .ci/run
}

(($#)) || usage
command=$1
shift
case "$command" in
  setup) set_up ;;
  demo) set_up; exec bash training_script/demo.sh "$@" ;;
  tests) set_up; lint; exec python -m pytest -q "$@" ;;
  quick) set_up; lint; exec python -m pytest -q -m "not slow and not distributed" "$@" ;;
  *) usage ;;
esac
