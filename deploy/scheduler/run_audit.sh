#!/usr/bin/env bash
# Scheduled data audit: one `beam-influence audit` run under $AUDIT_ROOT (local or gs://).
# The audit itself reuses the fitted method while the model is unchanged, scores only new or
# changed files of $TRAIN (the rest is carried over from the previous audit), writes the run
# under $AUDIT_ROOT/runs/<run id>/ with an HTML report, and points $AUDIT_ROOT/LATEST at it
# only when it finished. Made for cron (crontab.example): the run id is taken here because
# `%` is special in crontab lines, and overlapping runs are skipped (flock).
#
#   REPO=/opt/beam-influence AUDIT_ROOT=/srv/influence-audit \
#   MODEL=/srv/models/classifier.keras TRAIN='npz:/srv/data/day-*.npz' \
#   [QUERIES=npz:/srv/data/queries.npz] \
#   deploy/scheduler/run_audit.sh --solver=arnoldi [more audit / pipeline flags]
#
# Extra arguments go to `beam-influence audit` (and through it to the pipeline), e.g. the local
# multi-process runner: --direct_running_mode=multi_processing --direct_num_workers=2
# --tf_threads=1, or --runner=DataflowRunner --project=... to run the scoring on Dataflow.
set -euo pipefail

: "${REPO:?set REPO to the beam-influence checkout that holds .venv/}"
: "${AUDIT_ROOT:?set AUDIT_ROOT to the folder (or gs:// prefix) of all audits}"
: "${MODEL:?set MODEL (a .keras file)}"
: "${TRAIN:?set TRAIN (e.g. npz:/path/day-*.npz; each file is a partition)}"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
LOCK=${LOCK:-/tmp/beam-influence-audit.lock}

exec 9>"$LOCK"
if ! flock -n 9; then
  echo "run_audit: the previous audit is still running; skipping this one" >&2
  exit 0
fi

run_id=$(date -u +%Y%m%dT%H%M%SZ)
echo "run_audit: $(date -u +%FT%TZ) audit $run_id under $AUDIT_ROOT" >&2
cd "$REPO"
queries=()
if [ -n "${QUERIES:-}" ]; then queries=(--queries="$QUERIES"); fi
if PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pipelines.cli audit \
    --audit_root="$AUDIT_ROOT" --run_id="$run_id" --model="$MODEL" --train="$TRAIN" \
    "${queries[@]}" "$@"; then
  echo "run_audit: done; $AUDIT_ROOT/LATEST -> $run_id" >&2
else
  rc=$?
  echo "run_audit: the audit failed (exit $rc); LATEST unchanged" >&2
  exit "$rc"
fi
