"""The code keeps to the oldest Python that ``pyproject.toml`` declares.

CI's machines have one Python (3.11), so a newer construct or standard-library name
could slip in unnoticed and break an install on the declared floor. Every ``.py`` file of
the project is parsed with that version's grammar, and imports of standard-library names
added after it are refused."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("meprop_triton", "kernels", "bench", "tests")

# Standard-library names added in 3.11 .. 3.13 that a project on 3.10 may not import
# unguarded: module -> names (an empty set: the module itself is new).
NEWER_STDLIB = {
    (3, 11): {
        "tomllib": set(),
        "wsgiref.types": set(),
        "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type",
                   "Required", "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform",
                   "get_overloads", "clear_overloads"},
        "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember",
                 "global_enum", "property"},
        "datetime": {"UTC"},
        "asyncio": {"TaskGroup", "Runner", "timeout", "timeout_at", "Timeout", "Barrier"},
        "contextlib": {"chdir"},
        "hashlib": {"file_digest"},
        "operator": {"call"},
    },
    (3, 12): {
        "typing": {"override", "TypeAliasType"},
        "itertools": {"batched"},
        "sys": {"monitoring"},
    },
    (3, 13): {
        "typing": {"TypeIs", "ReadOnly", "NoDefault", "get_protocol_members", "is_protocol"},
        "warnings": {"deprecated"},
        "copy": {"replace"},
    },
}


def declared_floor() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', text, re.M)
    assert m, "pyproject.toml declares no requires-python = \">=X.Y\""
    return int(m.group(1)), int(m.group(2))


def project_files() -> list[Path]:
    files = sorted([*ROOT.glob("*.py"),  # the root's own (conftest.py)
                    *(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)])
    assert len(files) > 50, f"found only {len(files)} .py files under {ROOT}"
    return files


def newer_imports(tree: ast.AST, floor: tuple[int, int]) -> list[str]:
    """``module`` / ``module.name`` imports in ``tree`` that need a Python after ``floor``."""
    banned: dict[str, set[str]] = {}
    for version, modules in NEWER_STDLIB.items():
        if version > floor:
            for module, names in modules.items():
                banned.setdefault(module, set()).update(names)
    found = []
    aliases = {}  # import typing as t: t.Self is typing.Self
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname})
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in banned and not banned[a.name]]
        elif isinstance(node, ast.ImportFrom) and node.module in banned and node.level == 0:
            names = banned[node.module]
            if not names:
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name in names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id, node.value.id)
            if node.attr in banned.get(module, ()):
                found.append(f"{module}.{node.attr}")
    return found


def test_declared_floor_is_one_torch_supports():
    # torch 2.11, the oldest supported torch, needs Python >= 3.10
    assert declared_floor() >= (3, 10)


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_keeps_to_the_declared_python(path):
    floor = declared_floor()
    src = path.read_text()
    try:
        tree = ast.parse(src, str(path), feature_version=floor)
    except SyntaxError as e:
        pytest.fail(f"{path.relative_to(ROOT)}:{e.lineno}: not Python {floor[0]}.{floor[1]} syntax: {e.msg}")
    found = newer_imports(tree, floor)
    assert not found, f"{path.relative_to(ROOT)} uses {found}, newer than Python {floor[0]}.{floor[1]}"


@pytest.mark.parametrize(
    "snippet,bad",
    [
        ("try:\n    pass\nexcept* ValueError:\n    pass\n", "syntax"),  # 3.11
        ("type Alias = int\n", "syntax"),  # 3.12
        ("def f[T](x: T) -> T:\n    return x\n", "syntax"),  # 3.12
        ("import tomllib\n", "import"),
        ("from typing import Self\n", "import"),
        ("import itertools\nitertools.batched([1], 1)\n", "import"),
        ("from enum import StrEnum\n", "import"),
        ("import typing as t\nx: t.Self\n", "import"),  # through an alias
        ("import datetime as dt\ndt.UTC\n", "import"),
        ("match 1:\n    case 1:\n        pass\n", None),  # 3.10 itself: allowed
        ("from typing import TypeAlias, ParamSpec\n", None),  # 3.10 names: allowed
    ],
)
def test_the_check_catches_newer_code(snippet, bad):
    floor = (3, 10)
    try:
        tree = ast.parse(snippet, feature_version=floor)
    except SyntaxError:
        assert bad == "syntax", f"{snippet!r} was refused as {floor} syntax"
        return
    assert bad != "syntax", f"{snippet!r} parsed as Python {floor} syntax"
    assert bool(newer_imports(tree, floor)) == (bad == "import")
