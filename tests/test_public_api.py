"""The public face: every exported name resolves, is documented, and __all__ is sorted."""

from __future__ import annotations

import importlib

import pytest

import mitigate

MODULES = ["mitigate", "mitigate.diagnostics", "mitigate.integrations"]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_sorted_resolvable_and_documented(module_name):
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    assert names == sorted(names), f"{module_name}.__all__ is not sorted"
    undocumented = []
    for name in names:
        obj = getattr(module, name)
        if not (getattr(obj, "__doc__", None) or "").strip():
            undocumented.append(name)
    assert not undocumented, f"{module_name}: no docstring on {undocumented}"


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mitigate.nope  # noqa: B018


def test_errors_are_value_errors():
    assert issubclass(mitigate.UnsupportedArchitectureError, ValueError)
    assert issubclass(mitigate.StateMismatchError, ValueError)
