"""Lazy "module:attribute" registries, so optional backends are imported only when used."""

from __future__ import annotations

import importlib

from edgeloop.errors import EdgeloopError


def resolve(table: dict[str, str], name: str, what: str):
    """Import and return table[name] ("module:attribute"), with clear errors for users."""
    if name not in table:
        raise EdgeloopError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    module, attribute = table[name].split(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as e:
        raise EdgeloopError(f"the {name} {what} needs {e.name}, which is not installed; "
                            "pip install 'edgeloop[convert]'") from None
