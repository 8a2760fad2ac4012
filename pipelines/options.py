"""The pipeline's one ``PipelineOptions`` subclass. Unknown flags pass through to the runner.

The README's option table is generated from this class (``python -m pipelines.options``), so
the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys

from apache_beam.options.pipeline_options import PipelineOptions

METHODS = ("influence", "relatif", "tracin", "rps_l2", "rps_lje")
SOLVERS = ("arnoldi", "exact", "cg", "lissa")


def _flag(text) -> bool:
    """On/off options accept ``--name`` and ``--name=true|false`` (Flex Template parameters
    always arrive as ``--name=value``; an empty value means off)."""
    v = str(text).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class InfluenceOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("model")
        g.add_argument("--model", help="Keras model: a .keras file (local or gs://), loaded in safe mode")
        g.add_argument("--target_layers", default="",
                       help="comma-separated layer names, or an int N for the last N layers with "
                            "weights; empty = the last layer")
        g.add_argument("--loss", default="sparse_categorical_crossentropy",
                       help="per-example loss: sparse_categorical_crossentropy, "
                            "categorical_crossentropy, binary_crossentropy, mse")
        g.add_argument("--from_logits", default="auto", choices=("auto", "true", "false"),
                       help="whether model outputs are logits (auto: from the last activation)")
        g.add_argument("--l2", type=float, default=0.0,
                       help="L2 coefficient of the training objective (adds l2*I to the Hessian)")

        g = parser.add_argument_group("data")
        g.add_argument("--train", help="training examples: npz:PATH, parquet:GLOB, "
                                       "tfrecord:GLOB or tfds:NAME/SPLIT")
        g.add_argument("--queries", help="query (test) examples, same forms as --train")
        g.add_argument("--x_key", default="x", help="feature column / array / TFDS key")
        g.add_argument("--y_key", default="y", help="label column / array / TFDS key")
        g.add_argument("--id_key", default="",
                       help="id column / array; empty = ids from source name + row index")
        g.add_argument("--group_key", default="", help="group-id column for group influence")
        g.add_argument("--input_shape", default="",
                       help="shape of one example, e.g. 28,28,1 (to reshape flat Parquet lists)")
        g.add_argument("--feature_spec", default="",
                       help='TFRecord tf.train.Example spec as JSON: {"x": [[64], "float32"], '
                            '"y": [[], "int64"]}')
        g.add_argument("--tfds_data_dir", default="", help="TFDS data_dir (never downloads)")
        g.add_argument("--block_size", type=int, default=512,
                       help="examples per pipeline element (amortises per-element overhead)")
        g.add_argument("--max_bad_fraction", type=float, default=0.0,
                       help="fail the run when more than this fraction of examples are "
                            "dead-lettered (NaN, wrong shape, bad label)")

        g = parser.add_argument_group("method")
        g.add_argument("--method", default="influence", choices=METHODS)
        g.add_argument("--solver", default="arnoldi", choices=SOLVERS,
                       help="inverse-Hessian solver for influence / relatif")
        g.add_argument("--damping", type=float, default=0.0, help="adds damping*I to H")
        g.add_argument("--rank", type=int, default=32,
                       help="Arnoldi: eigenpairs kept (feature dimension)")
        g.add_argument("--arnoldi_iter", type=int, default=64, help="Arnoldi: Krylov steps (HVPs)")
        g.add_argument("--negative_eigenvalues", default="keep", choices=("keep", "drop", "abs"),
                       help="exact/Arnoldi policy for negative eigenvalues")
        g.add_argument("--cg_max_iter", type=int, default=100)
        g.add_argument("--cg_tol", type=float, default=1e-8)
        g.add_argument("--lissa_scale", type=float, default=10.0,
                       help="LiSSA: must exceed the largest eigenvalue of H + damping")
        g.add_argument("--lissa_depth", type=int, default=200)
        g.add_argument("--lissa_repeats", type=int, default=1)
        g.add_argument("--lissa_batch", type=int, default=64)
        g.add_argument("--checkpoints", default="",
                       help="TracIn: comma-separated .keras checkpoints")
        g.add_argument("--learning_rates", default="",
                       help="TracIn: comma-separated learning rate per checkpoint")
        g.add_argument("--projection_dim", type=int, default=0,
                       help="TracIn: random projection size per checkpoint (0 = none)")
        g.add_argument("--rps_lambda", type=float, default=1e-3, help="RPS-L2: L2 of the surrogate")
        g.add_argument("--lje_step", type=float, default=1e-4, help="RPS-LJE: ascent step size")
        g.add_argument("--fit_sample_size", type=int, default=50000,
                       help="examples the fit (reduce) step gathers on one worker (a "
                            "deterministic sample by id hash); 0 = all of them. The exact "
                            "solver always sums the Hessian over all examples")
        g.add_argument("--seed", type=int, default=0)

        g = parser.add_argument_group("output")
        g.add_argument("--output", help="output directory (local or gs://)")
        g.add_argument("--overwrite", type=_flag, nargs="?", const=True, default=False,
                       help="replace an existing result at --output (otherwise refuse)")
        g.add_argument("--k", type=int, default=10, help="proponents and opponents per query")
        g.add_argument("--group_order", type=int, default=1, choices=(1, 2),
                       help="group influence order when --group_key is set")
        g.add_argument("--write_pairwise", type=_flag, nargs="?", const=True, default=False,
                       help="also write every (query, train) score (small problems only)")
        g.add_argument("--write_features", type=_flag, nargs="?", const=True, default=False,
                       help="also write the feature vectors (for your own nearest-neighbour search)")
        g.add_argument("--batch_size", type=int, default=256,
                       help="examples per TensorFlow call on workers")
        g.add_argument("--tf_threads", type=int, default=0,
                       help="TensorFlow intra-op threads per worker process (0 = all cores)")


def options_markdown() -> str:
    """Markdown table of every option (pasted into README.md by `make docs`)."""
    parser = argparse.ArgumentParser(add_help=False)
    InfluenceOptions._add_argparse_args(parser)
    lines = ["| option | default | help |", "|---|---|---|"]
    for group in parser._action_groups:
        if not group._group_actions:
            continue
        lines.append(f"| **{group.title}** | | |")
        for a in group._group_actions:
            default = "" if a.default in (None, "", argparse.SUPPRESS) else f"`{a.default}`"
            choices = f" One of: {', '.join(map(str, a.choices))}." if a.choices else ""
            help_ = (a.help or "").replace("|", "\\|") + choices
            lines.append(f"| `{a.option_strings[0]}` | {default} | {help_} |")
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> None:
    """Replaces the table between the README's option markers."""
    text = open(path).read()
    begin, end = "<!-- options:begin -->\n", "\n<!-- options:end -->"
    i, j = text.index(begin) + len(begin), text.index(end)
    with open(path, "w") as f:
        f.write(text[:i] + options_markdown() + text[j:])


if __name__ == "__main__":
    if "--update-readme" in sys.argv:
        update_readme()
    sys.stdout.write(options_markdown() + "\n")
