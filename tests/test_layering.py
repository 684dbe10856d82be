"""The packages' layering, read from their source with `ast` (nothing is imported): the product never imports
transformers or peft (they are the reference in the tests and the benchmarks, tools/bench*.py), gemma/ imports
nothing from lora/, train/ or tools/, lora/ imports gemma/ and third-party code only, and train/ imports gemma/
and lora/ but not tools/.

Every import counts: at the top of a module, inside a function, under `if TYPE_CHECKING:` or `try:`, and
`importlib.import_module(...)` / `__import__(...)` of a literal name or of a module-level constant holding one.
One import is exempt, by file and name (EXEMPT): gemma.load(adapter=) loading the LoRA package at call time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gemma", "lora", "train")
# tools/ is no package: its modules import each other by name (tools/ is sys.path[0] when one runs).
TOOLS = {"tools", *(p.stem for p in (ROOT / "tools").glob("*.py"))}
REFERENCE = {"transformers", "peft"}
FORBIDDEN = {  # package -> first-party top-level names it must not import
    "gemma": {"lora", "train"} | TOOLS,
    "lora": {"train"} | TOOLS,
    "train": TOOLS,
}
# (file, module) imports allowed in spite of FORBIDDEN. gemma.load(source, adapter=DIR) is the one entry point for
# loading a model with its adapter, and adapters are lora/'s: gemma/formats/load.py imports lora.io when, and only
# when, an adapter is asked for (ADAPTER_MODULE), so that nothing of gemma/ depends on lora/ otherwise.
EXEMPT = {("gemma/formats/load.py", "lora.io")}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in `path`; relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = path.relative_to(root).with_suffix("").parts  # ("gemma", "model") or ("gemma", "__init__")
    package = here[:-1]
    # Module-level string constants (NAME = "..."), so that import_module(NAME) is seen as well as a literal.
    constants = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - (node.level - 1)]) if node.level else []  # from ..a import b
            if node.module:
                out.append((node.lineno, ".".join([*base, node.module])))
            else:  # from . import x: x is a module of the package
                out += [(node.lineno, ".".join([*base, alias.name])) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            fn, arg = node.func, node.args[0]
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
            else:
                name = constants.get(arg.id) if isinstance(arg, ast.Name) else None
            if called in ("import_module", "__import__") and name is not None:
                out.append((node.lineno, name))
    return out


def violations(package: str, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in modules(package)
        for line, name in imported(path)
        if name.split(".")[0] in forbidden and (path.relative_to(ROOT).as_posix(), name) not in EXEMPT
    ]


def test_each_exemption_is_a_real_import():
    """An exemption that no longer matches an import would quietly allow a new one of that name elsewhere in the
    file; each must name an import the checker finds."""
    for file, name in EXEMPT:
        assert name in [n for _, n in imported(ROOT / file)], (file, name)


def test_the_packages_have_modules():
    for package in PACKAGES:  # a wrong ROOT would make every other check pass vacuously
        assert (ROOT / package / "__init__.py").is_file() and len(modules(package)) > 2, package


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_transformers_or_peft(package):
    assert violations(package, REFERENCE) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_layering(package):
    assert violations(package, FORBIDDEN[package]) == []


def test_the_checker_sees_imports_everywhere(tmp_path):
    """The parser finds nested, relative and importlib imports (so an empty list above means something)."""
    fake = tmp_path / "gemma"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "m.py").write_text(
        "import os\n"
        "from . import sampling\n"
        "from .. import train\n"
        "def f():\n"
        "    from transformers import AutoModel\n"
        "    import peft.tuners\n"
        "    try:\n"
        "        import importlib\n"
        "        importlib.import_module('lora.io')\n"
        "    except ImportError:\n"
        "        __import__('tools')\n"
        "PLUGIN = 'lora.inject'\n"
        "def g():\n"
        "    return importlib.import_module(PLUGIN)\n"
    )
    found = sorted(imported(fake / "m.py", tmp_path))
    assert found == [
        (1, "os"),
        (2, "gemma.sampling"),
        (3, "train"),
        (5, "transformers"),
        (6, "peft.tuners"),
        (8, "importlib"),
        (9, "lora.io"),
        (11, "tools"),
        (14, "lora.inject"),
    ]


# gemma/'s own parts: the model core builds on nothing of the others; the formats and generation build on the core
# (and on the shared modules at gemma/'s top: errors, files, writing, cli, tokenizer) but not on each other; the
# server builds on generation. A part's name -> the parts of gemma/ it must not import.
PARTS = {
    "model": {"formats", "generation", "serving", "tokenizer", "cli"},
    "formats": {"generation", "serving"},
    "generation": {"formats", "serving", "cli"},
}


def part_violations(part: str) -> list[str]:
    forbidden = {f"gemma.{p}" for p in PARTS[part]}
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in modules(f"gemma/{part}")
        for line, name in imported(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


@pytest.mark.parametrize("part", sorted(PARTS))
def test_gemma_parts_layering(part):
    assert len(modules(f"gemma/{part}")) > 2, part  # the part exists (else the check is vacuous)
    assert part_violations(part) == []
