"""Command line: ``beam-influence --model m.keras --train npz:train.npz --queries npz:q.npz
--output out/ [--method ...] [runner flags]``. Unknown flags go to the Beam runner."""

from __future__ import annotations

import logging
import sys

from pipelines import run as run_lib


def setup_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # Beam's own INFO lines drown the per-stage progress a user wants to see.
    for noisy in ("apache_beam.runners", "apache_beam.io", "absl", "apache_beam.internal",
                  "apache_beam.typehints"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    try:
        manifest = run_lib.run(argv)
    except (run_lib.RunError, ValueError) as e:
        logging.getLogger("beam-influence").error("%s", e)
        return 2
    counts = manifest["row_counts"]
    out = manifest["options"].get("output")
    print(f"wrote {out}: " + ", ".join(f"{k}={v} rows" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
