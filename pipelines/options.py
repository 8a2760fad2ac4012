"""The pipeline's one ``PipelineOptions`` subclass, generated from ``InfluenceConfig``.

Every field of :class:`influence_ops.config.InfluenceConfig` is a flag of the same name, with
its help, default and choices; :func:`job_config` turns parsed options into the config that
every stage receives. Unknown flags pass through to the runner. The README's option table is
generated from this parser (``python -m pipelines.options``), so the docs cannot drift.
"""

from __future__ import annotations

import argparse
import os
import sys

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from influence_ops.config import GROUPS, InfluenceConfig, option_fields, parse_flag


def _cli_default(f):
    """The default as the CLI spells it (``--from_logits=auto``, ``--target_layers=``)."""
    if f.name == "from_logits":
        return "auto"
    if f.default is None or f.default == ():
        return ""
    return f.default


def add_arguments(parser) -> None:
    """Adds one argument per config field, grouped as in the config."""
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for f, meta in option_fields():
        kwargs = {"default": _cli_default(f), "help": meta["help"] or None}
        if meta["flag"]:
            kwargs.update(type=parse_flag, nargs="?", const=True)
        elif meta["parse"] is not None:
            kwargs["type"] = meta["parse"]
        choices = meta["choices"]
        if callable(choices):
            # Registries fill late (plugins): list them in the help, validate in the config.
            kwargs["help"] = f"{meta['help']}. One of: {', '.join(choices())} (or a plugin's)"
        elif choices:
            kwargs["choices"] = choices
        groups[meta["group"]].add_argument(f"--{f.name}", **kwargs)


class InfluenceOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_arguments(parser)


def job_config(options: PipelineOptions) -> InfluenceConfig:
    """The job's one :class:`InfluenceConfig` from its pipeline options (not yet validated)."""
    opts = options.view_as(InfluenceOptions)
    config = InfluenceConfig.from_mapping({f.name: getattr(opts, f.name)
                                           for f, _ in option_fields()})
    direct = options.view_as(DirectOptions)
    if not config.tf_threads and direct.direct_running_mode == "multi_processing":
        # Worker processes share the machine: each gets its part of the cores, not all of
        # them (N TF pools of all cores each oversubscribe them N times).
        workers = max(1, int(direct.direct_num_workers or 1))
        config = config.replace(tf_threads=max(1, (os.cpu_count() or 1) // workers))
    return config


def options_markdown() -> str:
    """Markdown table of every option (pasted into README.md by `make docs`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
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
