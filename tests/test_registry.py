"""Registry by discovery: methods are found without importing them; a broken method package is an error naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import medanomaly.methods as methods_pkg
from medanomaly.methods import get_method_class, list_methods
from medanomaly.methods.discovery import MethodDiscoveryError, method_index


def test_every_package_declares_what_it_registers() -> None:
    index = method_index(refresh=True)
    assert set(index) == set(list_methods()) >= {"intensity", "multitask", "mim-ood", "mae", "zscore"}
    for name, module in index.items():
        assert get_method_class(name).name == name and get_method_class(name).__module__ == module


def test_listing_imports_no_method_module() -> None:
    code = ("import sys; from medanomaly.methods import list_methods, get_method_class; list_methods(); "
            "heavy = [m for m in sys.modules if m.startswith('medanomaly.methods.') and m.count('.') > 2]; "
            "assert not heavy, heavy; get_method_class('intensity'); assert 'monai' not in sys.modules, 'monai'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def extra_methods_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(methods_pkg, "__path__", [*methods_pkg.__path__, str(tmp_path)])
    yield tmp_path
    monkeypatch.undo()  # the package path first, then the index without the planted packages
    for m in [m for m in sys.modules if m.startswith("medanomaly.methods.broken_") or m.startswith("medanomaly.methods.nodecl")]:
        del sys.modules[m]
    method_index(refresh=True)


def test_a_package_that_fails_to_import_is_named(extra_methods_dir: Path) -> None:
    (extra_methods_dir / "broken_method").mkdir()
    (extra_methods_dir / "broken_method" / "__init__.py").write_text("import no_such_module_here\n")
    with pytest.raises(MethodDiscoveryError, match="broken_method failed to import.*no_such_module_here"):
        method_index(refresh=True)


def test_a_package_without_methods_is_named(extra_methods_dir: Path) -> None:
    (extra_methods_dir / "nodecl").mkdir()
    (extra_methods_dir / "nodecl" / "__init__.py").write_text('"""No METHODS here."""\n')
    with pytest.raises(MethodDiscoveryError, match="nodecl declares no METHODS"):
        method_index(refresh=True)


def test_a_module_that_does_not_register_is_named(extra_methods_dir: Path) -> None:
    (extra_methods_dir / "broken_reg").mkdir()
    (extra_methods_dir / "broken_reg" / "__init__.py").write_text('METHODS = {"ghost": "medanomaly.methods.broken_reg.m"}\n')
    (extra_methods_dir / "broken_reg" / "m.py").write_text("x = 1\n")
    method_index(refresh=True)
    with pytest.raises(MethodDiscoveryError, match="did not register"):
        get_method_class("ghost")
