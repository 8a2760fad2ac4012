"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in deploy/Dockerfile).

The launcher VM runs ``python launch.py --param=value ...`` with the template's parameters and
the Dataflow settings (runner, project, region, temp location, ...). This file

1. expands ``{date}`` / ``{datetime}`` (UTC) in ``--output``, so that a scheduled launch with a
   fixed request body writes each run to its own folder (deploy/scheduler/);
2. adds ``--runner=DataflowRunner`` when the launcher passed no runner (without one,
   ``pipelines.run.make_pipeline`` would run the whole job on the launcher VM);
3. submits the job with ``pipelines.run.run(argv, wait=False)`` and returns as soon as Dataflow
   has accepted it (a Flex Template launcher must not wait for the job). The job finalises
   itself: its last step verifies the tables and writes ``run_manifest.json`` and then
   ``_SUCCESS``. Only ``run_metrics.json`` (Beam metrics, written by a launcher that waits) is
   missing for template launches.

Boolean template parameters (``--overwrite=true``) are parsed by the options class itself.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from typing import List, Optional

def template_argv(argv: List[str], now: Optional[datetime.datetime] = None) -> List[str]:
    """Template-style arguments -> arguments that ``PipelineOptions`` accepts."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        key = name[2:] if name.startswith("--") else None
        if eq and key == "output":
            value = value.replace("{date}", now.strftime("%Y-%m-%d")).replace(
                "{datetime}", now.strftime("%Y%m%dT%H%M%SZ"))
            arg = f"{name}={value}"
        out.append(arg)
    if not any(a == "--runner" or a.startswith("--runner=") for a in out):
        out.append("--runner=DataflowRunner")
    return out


def submit(argv: List[str]):
    """Validates, prepares the output and submits; returns the PipelineResult without waiting."""
    from pipelines import run as run_lib
    return run_lib.run(argv, wait=False)


def main(argv: Optional[List[str]] = None) -> int:
    from pipelines.cli import setup_logging
    from pipelines import run as run_lib
    setup_logging()
    log = logging.getLogger("beam-influence-launch")
    argv = sys.argv[1:] if argv is None else argv
    try:
        result = submit(template_argv(argv))
    except (run_lib.RunError, ValueError) as e:
        log.error("%s", e)
        return 2
    job_id = getattr(result, "job_id", None)
    log.info("submitted%s; not waiting (Flex Template launch): the job writes "
             "run_manifest.json and _SUCCESS when it finishes",
             f" job {job_id()}" if callable(job_id) else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
