"""Beam adapter over influence_ops: options, composite transforms, DoFns, writers, CLI."""
