"""Every module imports (a module no test imports is where bit rot starts)."""

import importlib
import pkgutil

import dpo_dist


def test_every_module_imports():
    names = [m.name for m in pkgutil.iter_modules(dpo_dist.__path__)]
    assert {"config", "data", "logps", "losses", "reference", "engine", "trainer", "metrics", "checkpoint"} <= set(names)
    for name in names:
        importlib.import_module(f"dpo_dist.{name}")
