"""Docstrings are examples: run every one in the package."""

import doctest
import importlib
import pkgutil

import pytest

import attnmask

MODULES = sorted(m.name for m in pkgutil.walk_packages(attnmask.__path__, "attnmask.")
                 if not m.name.endswith("__main__"))


def test_modules_found():
    assert "attnmask.masks" in MODULES and "attnmask.layout" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
