"""Command line: ``beam-influence --model m.keras --train npz:train.npz --queries npz:q.npz
--output out/ [--method ...] [runner flags]``. Unknown flags go to the Beam runner.

Every failure ends the process with one or two lines on stderr and a non-zero exit status:
2 for a failure with a known cause (an option, an input file, the model, the output
location, a result that did not pass its checks, the disk), 1 for an unexpected error.
``--verbose`` adds the traceback. Log lines and error messages pass through a filter that
redacts anything that looks like a credential.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
import traceback
import zipfile


def _import_paused_gc():
    """Imports the job (TensorFlow, Keras, Beam) with the cyclic garbage collector paused.

    Those imports create ~500k objects that live as long as the process; while they are made,
    the collector's full passes over the growing heap cost ~0.9 s of a ~5.5 s start (measured
    with ``gc.callbacks``). Once imported they are frozen out of later collections
    (``gc.freeze``), which keeps the job's own collections short too. Only when this import is
    the one that loads TensorFlow (a CLI start, not a process that has it already)."""
    fresh = "tensorflow" not in sys.modules
    was_enabled = gc.isenabled()
    if fresh:
        gc.disable()
    try:
        from pipelines import run
        return run
    finally:
        if fresh:
            gc.freeze()
            if was_enabled:
                gc.enable()


run_lib = _import_paused_gc()
from pipelines.redact import redact_text  # noqa: E402

log = logging.getLogger("beam-influence")
PROG = "beam-influence"
EXIT_KNOWN, EXIT_UNEXPECTED = 2, 1


class QuietBeamErrors(logging.Filter):
    """Drops Beam's own error records (a worker's traceback, logged before the runner
    re-raises the error): the CLI reports that error in one line (--verbose keeps them)."""

    def filter(self, record):
        return not (record.name.startswith("apache_beam") and record.levelno >= logging.ERROR)


class RedactingFilter(logging.Filter):
    """Replaces credentials in a log record's message (``pipelines.redact``)."""

    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is left as it is
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup_logging(level=logging.INFO, verbose: bool = True):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if not verbose and not any(isinstance(f, QuietBeamErrors) for f in handler.filters):
            handler.addFilter(QuietBeamErrors())
    # Beam's own INFO lines drown the per-stage progress a user wants to see.
    for noisy in ("apache_beam.runners", "apache_beam.io", "absl", "apache_beam.internal",
                  "apache_beam.typehints"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parser() -> argparse.ArgumentParser:
    """The job's options, for ``--help`` (the job itself parses them as Beam options)."""
    from pipelines.options import add_arguments
    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training-data influence for a Keras model, as an Apache Beam job: "
                    "reads --train and --queries, fits --method, writes Parquet tables, "
                    "run_manifest.json and _SUCCESS under --output.",
        epilog="Any other flag goes to the Beam runner (e.g. --runner=DataflowRunner, "
               "--direct_running_mode=multi_processing --direct_num_workers=2); without "
               "--runner the job runs locally on Beam's FnApiRunner.\n"
               "Exit status: 0 done, 2 a failure with a known cause (one line says which), "
               "1 an unexpected error.")
    add_arguments(ap)
    ap.add_argument("--verbose", action="store_true",
                    help="on failure, also print the traceback")
    return ap


_STEP = re.compile(r"\s*\[while running '([^']*)'\]\s*$")


# What the local runners raise when an SDK worker process disappears mid-bundle.
_WORKER_DIED = ("Channel closed prematurely", "SDK harness", "worker process exited")


def describe(e: BaseException):
    """``(exit status, one or two lines)`` for an exception that ended the run."""
    from influence_ops.artifacts import ArtifactError
    from influence_ops.config import ConfigError
    from influence_ops.model import InfluenceModelError
    from pipelines.read import SourceError
    text = str(e).strip()
    if any(sign in text for sign in _WORKER_DIED):
        return EXIT_KNOWN, [
            f"a worker process died during the run (killed, or out of memory): "
            f"{type(e).__name__}: {redact_text(text.splitlines()[0][:200])}; nothing was "
            "finalised (no _SUCCESS): rerun with --overwrite"]
    step = None
    m = _STEP.search(text)
    if m:  # the FnApiRunner re-raises a worker's exception with the step appended
        step, text = m.group(1).split("/")[0], text[:m.start()].rstrip()
    known = isinstance(e, (run_lib.RunError, ConfigError, SourceError, InfluenceModelError,
                           ArtifactError, OSError, zipfile.BadZipFile, ValueError,
                           argparse.ArgumentTypeError)) or _is_tf_error(e)
    if "in user code:" in text or "Traceback" in text or len(text.splitlines()) > 2:
        text = run_lib.tf_error_text(e) if text else type(e).__name__
    elif isinstance(e, OSError) and getattr(e, "strerror", None):
        text = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    if not text:
        text = type(e).__name__
    if not isinstance(e, (run_lib.RunError, ConfigError, SourceError, InfluenceModelError,
                          ArtifactError)):
        text = f"{type(e).__name__}: {text}"
    lines = [redact_text(text) + (f" [step {step}]" if step else "")]
    if not known:
        lines.append("an unexpected error; run again with --verbose for the traceback")
    return (EXIT_KNOWN if known else EXIT_UNEXPECTED), lines


def _is_tf_error(e) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith("tensorflow") and type(e).__name__.endswith("Error")


def _audit_summary(m: dict) -> None:
    c = m["counts"]
    print(f"audit {m['run_id']}: {c['rows']} training examples ranked ({c['scored_now']} "
          f"scored now, {c['carried']} carried over), fitted method "
          f"{'reused' if m['artifact']['reused'] else 'fitted'} ({m['artifact']['key']}); "
          f"{m['path']}")
    check = m.get("spot_check") or {}
    if check.get("pearson") is not None:
        print(f"spot check: {check['n']} top examples retrained without: Pearson "
              f"{check['pearson']:.3f}, signs agree {check['sign_agreement']:.0%}")
    if m.get("report"):
        print(f"report: {m['report']}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    audit = bool(argv) and argv[0] == "audit"
    if audit:
        argv = argv[1:]
    if "-h" in argv or "--help" in argv:
        if audit:
            from pipelines.audit import parser as audit_parser
            audit_parser().print_help()
        else:
            parser().print_help()
            print("\nSubcommand: beam-influence audit --audit_root=... (a scheduled data "
                  "audit; see beam-influence audit --help)")
        return 0
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    setup_logging(verbose=verbose)
    try:
        if audit:
            from pipelines.audit import audit as run_audit
            _audit_summary(run_audit(argv))
            return 0
        manifest = run_lib.run(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (no _SUCCESS written)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure: one or two lines and a status
        status, lines = describe(e)
        if verbose:
            trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            print(redact_text(trace), file=sys.stderr, end="")
        for i, line in enumerate(lines):
            print(f"{PROG}: {'error: ' if i == 0 else ''}{line}", file=sys.stderr)
        return status
    counts = manifest["row_counts"]
    out = manifest["options"].get("output")
    print(f"wrote {out}: " + ", ".join(f"{k}={v} rows" for k, v in counts.items()))
    for w in manifest.get("warnings", []):
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
