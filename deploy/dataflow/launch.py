"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in deploy/Dockerfile).

The launcher VM runs ``python launch.py --param=value ...`` with the template's parameters and
the Dataflow settings (runner, project, region, temp location, ...). This file

1. turns the template's boolean parameters into flags: a template parameter always arrives as
   ``--name=value``, but ``--overwrite``, ``--write_pairwise`` and ``--write_features`` are
   argparse ``store_true`` flags that reject ``--overwrite=true`` (exit 2);
2. expands ``{date}`` / ``{datetime}`` (UTC) in ``--output``, so that a scheduled launch with a
   fixed request body writes each run to its own folder (deploy/scheduler/);
3. adds ``--runner=DataflowRunner`` when the launcher passed no runner (without one,
   ``pipelines.run.make_pipeline`` would run the whole job on the launcher VM);
4. builds and submits the job exactly as ``pipelines.run.run()`` does, and returns as soon as
   Dataflow has accepted it. Dataflow requires that (a Flex Template launcher must not call
   ``wait_until_finish``), so ``run()`` itself, which waits for the job and then writes
   ``run_manifest.json`` and ``_SUCCESS``, is not used here. Consequence: **a job launched
   from the template writes its tables but no run_manifest.json and no _SUCCESS marker**; check
   the job state (``gcloud dataflow jobs describe``) before reading its output.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from typing import List, Optional

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no", "")


def boolean_flags() -> List[str]:
    """The ``store_true`` options of InfluenceOptions (read from the class, not listed here)."""
    from pipelines.options import InfluenceOptions
    parser = argparse.ArgumentParser(add_help=False)
    InfluenceOptions._add_argparse_args(parser)
    return sorted(a.dest for a in parser._actions if isinstance(a, argparse._StoreTrueAction))


def template_argv(argv: List[str], now: Optional[datetime.datetime] = None) -> List[str]:
    """Template-style arguments -> arguments that ``PipelineOptions`` accepts."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    flags = set(boolean_flags())
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        key = name[2:] if name.startswith("--") else None
        if eq and key in flags:
            v = value.strip().lower()
            if v in TRUE:
                out.append(name)
            elif v not in FALSE:
                raise ValueError(f"{name}: expected true or false, got {value!r}")
            continue
        if eq and key == "output":
            value = value.replace("{date}", now.strftime("%Y-%m-%d")).replace(
                "{datetime}", now.strftime("%Y%m%dT%H%M%SZ"))
            arg = f"{name}={value}"
        out.append(arg)
    if not any(a == "--runner" or a.startswith("--runner=") for a in out):
        out.append("--runner=DataflowRunner")
    return out


def submit(argv: List[str]):
    """What ``pipelines.run.run()`` does up to ``p.run()``; returns the PipelineResult."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
    from pipelines import run as run_lib
    from pipelines import stages
    from pipelines.options import InfluenceOptions

    opts = PipelineOptions(argv)
    opts.view_as(SetupOptions).save_main_session = False
    iopts = opts.view_as(InfluenceOptions)
    FileSystems.set_options(opts)
    run_lib.validate(iopts)
    imodel = stages.build_imodel(stages.model_config(iopts))  # fail fast: model + layers load
    run_lib.prepare_output(iopts.output, iopts.overwrite)
    p = run_lib.make_pipeline(opts)
    run_lib.build(p, iopts, stages.label_spec(imodel))
    return p.run()


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
    log.info("submitted%s; not waiting (Flex Template launch): no run_manifest.json/_SUCCESS",
             f" job {job_id()}" if callable(job_id) else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
