"""A wheel ships every package: pyproject's explicit package list names each one."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = cfg.get("package-dir", {})
    return {name: ROOT / dirs.get(name, name.replace(".", "/")) for name in cfg["packages"]}


def test_every_package_is_listed():
    listed = _package_dirs()
    for name, where in listed.items():
        assert (where / "__init__.py").is_file() or name == "mlx_specstream.demo", f"{name}: no package at {where}"
    found = {p.parent for p in (ROOT / "mlx_specstream").rglob("__init__.py")}
    missing = sorted(str(p.relative_to(ROOT)) for p in found if p not in set(listed.values()))
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {missing}"
