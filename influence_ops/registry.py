"""The two registries: influence methods and curvature models, each a class under its name.

A new method or curvature model is one file whose class carries a decorator::

    @register_method("my_method")
    class MyMethod(InfluenceMethod): ...

    @register_curvature("my_curvature")
    class MyCurvature(Curvature): ...

The CLI's ``--method`` / ``--solver`` choices, artifact loading and the README's option table
all read these registries, so nothing else needs an edit. Artifacts record the module of their
class, so a method registered outside this package (a plugin, or a test) is imported again
when its artifact is loaded in a fresh process (see ``--plugins`` for the workers).
"""

from __future__ import annotations

import importlib
from typing import Dict, Type

_METHODS: Dict[str, type] = {}
_CURVATURES: Dict[str, type] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Imports the built-in methods and curvature models (they register themselves)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("influence_ops.curvature")
        importlib.import_module("influence_ops.methods")


def _register(table: Dict[str, type], kind: str, name: str):
    def deco(cls):
        old = table.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                      cls.__qualname__):
            raise ValueError(f"{kind} {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}")
        table[name] = cls
        cls.registered_name = name
        return cls
    return deco


def register_method(name: str):
    """Class decorator: makes an :class:`~influence_ops.methods.base.InfluenceMethod`
    available as ``--method=name`` and ``InfluenceCalculator(method=name)``."""
    return _register(_METHODS, "method", name)


def register_curvature(name: str):
    """Class decorator: makes a :class:`~influence_ops.curvature.base.Curvature` available as
    ``--solver=name`` and ``InfluenceCalculator(solver=name)``."""
    return _register(_CURVATURES, "curvature model", name)


def import_plugins(modules) -> None:
    """Imports plugin modules (comma-separated string or list) so that they register."""
    if isinstance(modules, str):
        modules = [m for m in modules.split(",") if m.strip()]
    for m in modules or ():
        importlib.import_module(m.strip())


def _names(table, builtin_only: bool):
    _load_builtins()
    return tuple(n for n, c in table.items()
                 if not builtin_only or c.__module__.startswith("influence_ops."))


def method_names(builtin_only: bool = False):
    """Registered method names (``builtin_only``: those shipped with influence_ops)."""
    return _names(_METHODS, builtin_only)


def curvature_names(builtin_only: bool = False):
    return _names(_CURVATURES, builtin_only)


def _get(table, kind, names_fn, name: str, module: str = None) -> Type:
    _load_builtins()
    if name not in table and module:
        importlib.import_module(module)
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(names_fn())}")
    return table[name]


def get_method(name: str, module: str = None) -> Type:
    return _get(_METHODS, "method", method_names, name, module)


def get_curvature(name: str, module: str = None) -> Type:
    return _get(_CURVATURES, "solver (curvature model)", curvature_names, name, module)
