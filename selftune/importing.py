"""Objects named in the config as ``'module:attribute'`` (extension points: chat models, tools)."""

from __future__ import annotations

import importlib

from selftune.settings import ConfigError

__all__ = ["import_object"]


def import_object(spec: str, where: str) -> object:
    """The object at ``'module:attribute'`` (dotted attributes allowed); ConfigError naming ``where``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise ConfigError(f"{where}: expected 'module:attribute'")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(f"{where}: cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target
