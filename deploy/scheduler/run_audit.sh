#!/usr/bin/env bash
# Scheduled data audit on the local runner: one run of the pipeline into a new timestamped
# folder under $AUDIT_ROOT, and $AUDIT_ROOT/latest pointing at the newest *finished* result
# (the pipeline writes _SUCCESS only for a valid result, and this script moves `latest` only
# when the pipeline exits 0). Made for cron (crontab.example): the date is taken here because
# `%` is special in crontab lines, and overlapping runs are skipped (flock).
#
#   REPO=/opt/beam-influence AUDIT_ROOT=/srv/influence-audit \
#   MODEL=/srv/models/classifier.keras TRAIN=npz:/srv/data/train.npz \
#   QUERIES=npz:/srv/data/queries.npz \
#   deploy/scheduler/run_audit.sh --method=influence --solver=arnoldi [more pipeline flags]
#
# Extra arguments go to the pipeline (`python -m pipelines.cli`), e.g. the local multi-process
# runner: --direct_running_mode=multi_processing --direct_num_workers=2 --tf_threads=1
set -euo pipefail

: "${REPO:?set REPO to the beam-influence checkout that holds .venv/}"
: "${AUDIT_ROOT:?set AUDIT_ROOT to the folder that receives one result folder per run}"
: "${MODEL:?set MODEL (a .keras file)}"
: "${TRAIN:?set TRAIN (e.g. npz:/path/train.npz)}"
: "${QUERIES:?set QUERIES (e.g. npz:/path/queries.npz)}"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}

mkdir -p "$AUDIT_ROOT"
exec 9>"$AUDIT_ROOT/.lock"
if ! flock -n 9; then
  echo "run_audit: the previous audit is still running; skipping this one" >&2
  exit 0
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="$AUDIT_ROOT/$stamp"
echo "run_audit: $(date -u +%FT%TZ) writing $out" >&2
cd "$REPO"
if PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pipelines.cli \
    --model="$MODEL" --train="$TRAIN" --queries="$QUERIES" --output="$out" "$@"; then
  ln -sfn "$stamp" "$AUDIT_ROOT/latest"
  echo "run_audit: done; $AUDIT_ROOT/latest -> $stamp" >&2
else
  rc=$?
  echo "run_audit: the pipeline failed (exit $rc); $out has no _SUCCESS, latest unchanged" >&2
  exit "$rc"
fi
