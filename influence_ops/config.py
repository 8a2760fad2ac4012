"""One typed configuration for a whole influence job, shared by the CLI, the pipeline and the
notebook API.

:class:`InfluenceConfig` is a frozen dataclass whose field names are the command-line option
names (``--rank`` is ``config.rank`` everywhere). The pipeline builds it once from its
``PipelineOptions`` (``pipelines.options``, whose flags are generated from these fields) and
hands it to every stage; ``InfluenceCalculator`` builds the same object from keyword
arguments. Validation happens in one place, :meth:`InfluenceConfig.validate`.

Values are normalised on construction, so the CLI form and the Python form of a value give
equal configs: ``target_layers="dense_1,out"`` == ``target_layers=("dense_1", "out")``,
``"2"`` == ``2``, ``""`` == ``None`` (the last layer); ``checkpoints="a.keras,b.keras"`` ==
``("a.keras", "b.keras")``; ``from_logits="auto"`` == ``None``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

import numpy as np

GROUPS = ("model", "data", "method", "output")


class ConfigError(ValueError):
    """An option value that cannot work; the message names the option (``--name``)."""


def parse_flag(text) -> bool:
    """On/off values accept true/false/1/0/yes/no/on/off (Flex Template parameters always
    arrive as ``--name=value``; an empty value means off)."""
    if isinstance(text, bool):
        return text
    v = str(text).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _opt(group: str, help: str, parse=None, choices=None, flag: bool = False):
    """Field metadata: the option's group, help text, CLI parser and choices.

    ``choices`` may be a tuple or a callable returning one (registries fill them late, so a
    method registered by a plugin is a valid choice)."""
    assert group in GROUPS
    return {"group": group, "help": help, "parse": parse, "choices": choices, "flag": flag}


def _method_choices():
    from influence_ops import registry
    return registry.method_names(builtin_only=True)


def _curvature_choices():
    from influence_ops import registry
    return registry.curvature_names(builtin_only=True)


def _csv(value) -> Tuple:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def _target_layers(value):
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, slice):  # slice(first, last): a range, inclusive
        return (f"{'' if value.start is None else value.start}:"
                f"{'' if value.stop is None else value.stop}",)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (f"{value[0]}:{value[1]}",)  # (first, last) layer indices
    if isinstance(value, str):
        return int(value) if value.strip().isdigit() else _csv(value)
    return tuple(value)


GROUP_ORDERS = (1, 2, "newton")


def _group_order(value):
    """``1``, ``2`` (ints, also from text) or ``"newton"``; anything else is left for
    validation to reject."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    v = str(value).strip().lower()
    return int(v) if v.isdigit() else v


def _from_logits(value):
    if value is None or isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")
    return {"auto": None, "true": True, "false": False}[v]


@dataclass(frozen=True)
class InfluenceConfig:
    # -- model --------------------------------------------------------------------------------
    model: Any = field(default=None, metadata=_opt(
        "model", "Keras model: a .keras file (local or gs://), loaded in safe mode"))
    target_layers: Union[None, int, Tuple[str, ...]] = field(default=None, metadata=_opt(
        "model", "comma-separated layer names, or an int N for the last N layers with "
                 "weights, or a range FIRST:LAST of the layers with weights from FIRST to LAST "
                 "inclusive (each a layer name or an index into model.layers, negative from the "
                 "end, empty = open end; e.g. dense_1:dense_3, 1:-1); empty = the last layer",
        parse=str))
    loss: Any = field(default="sparse_categorical_crossentropy", metadata=_opt(
        "model", "per-example loss: sparse_categorical_crossentropy, categorical_crossentropy, "
                 "binary_crossentropy, mse"))
    from_logits: Optional[bool] = field(default=None, metadata=_opt(
        "model", "whether model outputs are logits (auto: from the last activation)",
        parse=str, choices=("auto", "true", "false")))
    l2: float = field(default=0.0, metadata=_opt(
        "model", "L2 coefficient of the training objective (adds l2*I to the Hessian); the "
                 "target layers' own Keras L2 regularisers are added to it automatically",
        parse=float))
    unsafe_model_loading: bool = field(default=False, metadata=_opt(
        "model", "load --model with Keras safe mode off. RISK: a .keras file can hold Python "
                 "code (Lambda layers, custom functions) that then runs on the driver and on "
                 "every worker, with their credentials; use it only for a file you trust "
                 "(TracIn --checkpoints always load in safe mode)", flag=True))
    regularizers: str = field(default="include", metadata=_opt(
        "model", "include: the target layers' Keras regularisers are part of the objective "
                 "(L2 only; others are an error); ignore: leave them out",
        choices=("include", "ignore")))
    artifact: str = field(default="", metadata=_opt(
        "model", "score with this fitted method instead of fitting: the artifact/ folder of an "
                 "earlier run (local or gs://), fitted for the same --model (its fingerprint "
                 "is checked) and the same method options"))

    # -- data ---------------------------------------------------------------------------------
    train: str = field(default="", metadata=_opt(
        "data", "training examples: npz:PATH, parquet:GLOB, tfrecord:GLOB or tfds:NAME/SPLIT"))
    queries: str = field(default="", metadata=_opt(
        "data", "query (test) examples, same forms as --train; empty = no queries "
                "(self-influence only)"))
    x_key: str = field(default="x", metadata=_opt("data", "feature column / array / TFDS key"))
    y_key: str = field(default="y", metadata=_opt("data", "label column / array / TFDS key"))
    id_key: str = field(default="", metadata=_opt(
        "data", "id column / array; empty = ids from source name + row index"))
    group_key: str = field(default="", metadata=_opt(
        "data", "group-id column for group influence"))
    weight_key: str = field(default="", metadata=_opt(
        "data", "sample-weight column / array / key of --train (numbers, finite and >= 0): "
                "the objective becomes (1/n) sum_i w_i l_i, so the Hessian, the train "
                "gradients w_i g_i, self-influence and the loss column are weighted; rows "
                "with a missing, negative or non-finite weight are dead-lettered; --queries "
                "are unweighted (a column of that name there is ignored). Methods influence "
                "/ relatif with solver exact, arnoldi, cg, lissa or pcg (arnoldi "
                "preconditioner), --correction=none, first-order groups"))
    input_shape: str = field(default="", metadata=_opt(
        "data", "shape of one example, e.g. 28,28,1 (to reshape flat lists; flat Parquet "
                "lists default to the model's input shape)"))
    feature_spec: str = field(default="", metadata=_opt(
        "data", 'TFRecord tf.train.Example spec as JSON: {"x": [[64], "float32"], '
                '"y": [[], "int64"]}'))
    tfds_data_dir: str = field(default="", metadata=_opt(
        "data", "TFDS data_dir (never downloads)"))
    block_size: int = field(default=512, metadata=_opt(
        "data", "examples per pipeline element (amortises per-element overhead)", parse=int))
    max_bad_fraction: float = field(default=0.0, metadata=_opt(
        "data", "fail the run when more than this fraction of examples are dead-lettered "
                "(NaN, wrong shape, bad label)", parse=float))

    # -- method -------------------------------------------------------------------------------
    method: str = field(default="influence", metadata=_opt(
        "method", "influence method", choices=_method_choices))
    solver: Optional[str] = field(default=None, metadata=_opt(
        "method", "curvature model (inverse-Hessian solver); empty = the method's default "
                  "(pcg for influence / relatif: exact-quality query solves; exact for "
                  "rps_lje)",
        choices=_curvature_choices))
    damping: float = field(default=0.0, metadata=_opt(
        "method", "adds damping*I to H", parse=float))
    rank: int = field(default=32, metadata=_opt(
        "method", "Arnoldi: eigenpairs kept (feature dimension)", parse=int))
    arnoldi_iter: int = field(default=64, metadata=_opt(
        "method", "Arnoldi: Krylov steps (HVPs)", parse=int))
    force_hermitian: bool = field(default=True, metadata=_opt(
        "method", "Arnoldi: symmetrise the projected Hessian (A + A^T)/2 before its "
                  "eigendecomposition (real Ritz values, orthonormal vectors); off: eig of the "
                  "non-symmetric projection as it is, whose close or indefinite eigenvalues can "
                  "turn complex when float32 HVPs are not symmetric (pcg's deflation always "
                  "symmetrises)", flag=True))
    negative_eigenvalues: str = field(default="keep", metadata=_opt(
        "method", "exact/Arnoldi policy for negative eigenvalues",
        choices=("keep", "drop", "abs")))
    cg_max_iter: int = field(default=100, metadata=_opt(
        "method", "CG: iterations at most", parse=int))
    cg_tol: float = field(default=1e-8, metadata=_opt(
        "method", "CG: stop at residual <= tol * ||b||", parse=float))
    lissa_scale: float = field(default=10.0, metadata=_opt(
        "method", "LiSSA: must exceed the largest eigenvalue of H + damping", parse=float))
    lissa_depth: int = field(default=200, metadata=_opt(
        "method", "LiSSA: recursion steps", parse=int))
    lissa_repeats: int = field(default=1, metadata=_opt(
        "method", "LiSSA: independent estimates averaged", parse=int))
    lissa_batch: int = field(default=64, metadata=_opt(
        "method", "LiSSA: examples per mini-batch Hessian", parse=int))
    fisher: str = field(default="true_fisher", metadata=_opt(
        "method", "EK-FAC / K-FAC: labels of the output gradients: sampled from the model "
                  "(true_fisher), the given labels (empirical) or the exact expectation over "
                  "the outputs (exact_ggn, cost x classes)",
        choices=("true_fisher", "empirical", "exact_ggn")))
    ekfac_relative_damping: float = field(default=0.1, metadata=_opt(
        "method", "EK-FAC / K-FAC: damping as a fraction of the mean eigenvalue, used when "
                  "--damping is 0", parse=float))
    preconditioner: str = field(default="arnoldi", metadata=_opt(
        "method", "pcg: preconditioner of the query solves (arnoldi: deflation by the top "
                  "--rank eigenpairs; ekfac; none = plain CG)",
        choices=("arnoldi", "ekfac", "none")))
    checkpoints: Tuple[Any, ...] = field(default=(), metadata=_opt(
        "method", "TracIn: comma-separated .keras checkpoints", parse=str))
    learning_rates: Tuple[float, ...] = field(default=(), metadata=_opt(
        "method", "TracIn: comma-separated learning rate per checkpoint", parse=str))
    projection_dim: int = field(default=0, metadata=_opt(
        "method", "TracIn: random projection size per checkpoint (0 = none)", parse=int))
    rps_lambda: float = field(default=1e-3, metadata=_opt(
        "method", "RPS-L2: L2 of the surrogate", parse=float))
    lje_step: float = field(default=1e-4, metadata=_opt(
        "method", "RPS-LJE: ascent step size", parse=float))
    correction: str = field(default="none", metadata=_opt(
        "method", "influence: per-example scores corrected for leave-one-out: loo = "
                  "g_test^T (H - H_i/n)^-1 g_i, the example's own Hessian taken out of H "
                  "(one C x C Woodbury system per example, C = model outputs); none = first "
                  "order", choices=("none", "loo")))
    fit_sample_size: int = field(default=50000, metadata=_opt(
        "method", "examples the fit (reduce) step gathers on one worker (a deterministic "
                  "sample by id hash); 0 = all of them. The exact solver always sums the "
                  "Hessian over all examples", parse=int))
    seed: int = field(default=0, metadata=_opt(
        "method", "seed of every random choice (sampling, projections, Arnoldi start)",
        parse=int))
    plugins: Tuple[str, ...] = field(default=(), metadata=_opt(
        "method", "comma-separated Python modules imported first on the driver and on every "
                  "worker: they register extra methods or curvature models", parse=str))

    # -- output -------------------------------------------------------------------------------
    output: str = field(default="", metadata=_opt("output", "output directory (local or gs://)"))
    overwrite: bool = field(default=False, metadata=_opt(
        "output", "replace an existing result at --output (otherwise refuse)", flag=True))
    k: int = field(default=10, metadata=_opt(
        "output", "proponents and opponents per query", parse=int))
    group_order: Union[int, str] = field(default=1, metadata=_opt(
        "output", "group influence order when --group_key is set (newton: one Newton step on "
                  "the objective without the group; explicit d x d Hessians per group, modest "
                  "d)", parse=_group_order, choices=GROUP_ORDERS))
    write_pairwise: bool = field(default=False, metadata=_opt(
        "output", "also write every (query, train) score (small problems only)", flag=True))
    write_features: bool = field(default=False, metadata=_opt(
        "output", "also write the feature vectors (for your own nearest-neighbour search)",
        flag=True))
    boundary: str = field(default="none", metadata=_opt(
        "output", "also write boundary distances per training example in self_influence: "
                  "sample (input space, DeepFool steps), weights (target weights) or both; "
                  "each costs several forward+backward passes per example",
        choices=("none", "sample", "weights", "both")))
    examples_top: int = field(default=0, metadata=_opt(
        "output", "also write examples/: the inputs of the N highest self-influence training "
                  "examples, of the queries and of their listed proponents and opponents",
        parse=int))
    sample_rows: int = field(default=0, metadata=_opt(
        "output", "also write sample/: the inputs of N training rows, the N smallest id "
                  "hashes (a deterministic sample that merges across runs)", parse=int))
    batch_size: int = field(default=256, metadata=_opt(
        "output", "examples per TensorFlow call on workers", parse=int))
    tf_threads: int = field(default=0, metadata=_opt(
        "output", "TensorFlow intra-op threads per worker process (0 = all cores; "
                  "with --direct_running_mode=multi_processing, the cores divided among the "
                  "--direct_num_workers workers)", parse=int))

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        set_("target_layers", _target_layers(self.target_layers))
        set_("from_logits", _from_logits(self.from_logits))
        set_("checkpoints", _csv(self.checkpoints))
        set_("learning_rates", tuple(float(v) for v in _csv(self.learning_rates)))
        set_("plugins", _csv(self.plugins))
        set_("group_order", _group_order(self.group_order))
        set_("solver", self.solver or None)
        for f in dataclasses.fields(self):
            parse = f.metadata.get("parse")
            v = getattr(self, f.name)
            if f.metadata.get("flag"):
                set_(f.name, parse_flag(v))
            elif parse in (int, float) and isinstance(v, (str, int, float)) \
                    and not isinstance(v, bool):
                try:
                    set_(f.name, parse(v))
                except ValueError:
                    raise ConfigError(f"--{f.name}={v!r}: expected a number") from None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict, strict: bool = True) -> "InfluenceConfig":
        """From a dict of option values (e.g. ``PipelineOptions.get_all_options()``); keys
        that are not fields are ignored unless ``strict`` and they look like ours."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    def replace(self, **changes) -> "InfluenceConfig":
        return dataclasses.replace(self, **changes)

    # -- validation (the one place) -----------------------------------------------------------
    def validate(self, for_job: bool = False) -> "InfluenceConfig":
        """Raises :class:`ConfigError` naming the option; returns self for chaining.

        ``for_job``: also the options a pipeline run needs (model, data and output paths)."""
        from influence_ops import registry
        registry.import_plugins(self.plugins)
        if for_job:
            missing = [f"--{k}" for k in ("model", "train", "output")
                       if not getattr(self, k)]
            if missing:
                raise ConfigError(f"missing required options: {', '.join(missing)}")
        try:
            method_cls = registry.get_method(self.method)
            if self.solver:
                registry.get_curvature(self.solver)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.negative_eigenvalues not in ("keep", "drop", "abs"):
            raise ConfigError("--negative_eigenvalues must be keep, drop or abs")
        positive_ints = ("k", "block_size", "batch_size", "rank", "arnoldi_iter", "cg_max_iter",
                         "lissa_depth", "lissa_repeats", "lissa_batch")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("damping", "l2", "fit_sample_size", "projection_dim", "tf_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("--max_bad_fraction must lie in [0, 1]")
        if self.group_order not in GROUP_ORDERS:
            raise ConfigError("--group_order must be 1, 2 or newton")
        if self.group_key and self.group_order == 2 and not method_cls.second_order_groups:
            raise ConfigError(
                "--group_order=2 (second-order group influence) needs an influence-function "
                f"method (--method=influence or relatif), not {self.method}")
        if self.boundary not in ("none", "sample", "weights", "both"):
            raise ConfigError("--boundary must be none, sample, weights or both")
        if for_job and self.group_key and not self.queries:
            raise ConfigError("--group_key (group influence on the queries) needs --queries")
        for name in ("examples_top", "sample_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.correction not in ("none", "loo"):
            raise ConfigError("--correction must be none or loo")
        if self.correction != "none" and not getattr(method_cls, "loo_correction", False):
            raise ConfigError(
                f"--correction={self.correction} (leave-one-out-corrected influence) is defined "
                f"for --method=influence, not {self.method}")
        if self.correction != "none" and self.group_key and self.group_order == 1:
            raise ConfigError(
                "--correction=loo corrects each example's train features; summed per group "
                "they do not predict removing the group: use --group_order=newton (the group's "
                "own curvature taken out of H) or run groups without --correction")
        if self.weight_key:
            self.check_sample_weights()
        method_cls.validate_config(self)
        return self

    WEIGHTED_SOLVERS = ("exact", "arnoldi", "cg", "lissa", "pcg")

    def check_sample_weights(self) -> None:
        """Raises :class:`ConfigError` unless the method takes sample weights (the notebook
        API's ``fit(sample_weight=...)`` and the pipeline's ``--weight_key``): influence /
        relatif with a curvature model whose fit is a weighted Hessian (K-FAC / EK-FAC
        factors and the leave-one-out correction's per-example Hessians are not weighted),
        and groups of first order (order 2 and Newton count members, not weights)."""
        from influence_ops import registry
        solver = self.solver or getattr(registry.get_method(self.method), "default_solver",
                                        None)
        problems = []
        if self.method not in ("influence", "relatif"):
            problems.append(f"method={self.method}")
        elif solver not in self.WEIGHTED_SOLVERS or (solver == "pcg"
                                                     and self.preconditioner == "ekfac"):
            problems.append(f"solver={solver}" + ("/preconditioner=ekfac" if solver == "pcg"
                                                  else ""))
        if self.correction != "none":
            problems.append(f"correction={self.correction}")
        if problems:
            raise ConfigError(
                "sample weights are supported for method influence / relatif with solver "
                f"{', '.join(self.WEIGHTED_SOLVERS)} (pcg with the arnoldi preconditioner) "
                f"and correction='none'; not {', '.join(problems)}")
        if self.group_key and self.group_order != 1:
            raise ConfigError(
                f"--group_order={self.group_order} does not take sample weights (its "
                "coefficients count the group's members); use --group_order=1 with "
                "--weight_key")

    # -- views --------------------------------------------------------------------------------
    def method_options(self) -> dict:
        """The options that define a fitted method (recorded in its artifact)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata["group"] == "method" or f.name in (
                    "target_layers", "loss", "from_logits", "l2", "regularizers")}

    @property
    def boundary_columns(self) -> Tuple[str, ...]:
        """The self-influence table's boundary columns that ``--boundary`` asks for."""
        return {"none": (), "sample": ("sample_boundary",), "weights": ("weights_boundary",),
                "both": ("sample_boundary", "weights_boundary")}[self.boundary]

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)


def option_fields():
    """``(field, metadata)`` of every option in declaration order (for the CLI parser)."""
    return [(f, f.metadata) for f in dataclasses.fields(InfluenceConfig)]
