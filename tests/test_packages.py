"""The packages keep to their trust domains (../shared/design/ARCHITECTURE.md's "may import" column, with
the modules tee_sim publishes to the converter and the flat exceptions module everyone raises: README's
Layout), read from every import statement in their source, function-level ones included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"models", "converters", "tee_sim", "shadownet"}
# What each package may import besides the standard library and itself. tee_sim publishes a few modules
# to the vendor's converter, as OP-TEE publishes a TA's header and its attestation protocol; every package
# raises the one flat module of exceptions, and may read whether the user asked for errors' details; the
# zoo writes its files as the commands write theirs (shadownet.files: atomically, checked first).
ALLOWED = {
    "tee_sim": {"numpy", "cryptography", "ai_edge_litert"},
    "converters": {"numpy", "ai_edge_litert", "flatbuffers", "cryptography", "tensorflow", "keras",
                   "shadownet.exceptions", "shadownet.debug", "tee_sim", "tee_sim.program",
                   "tee_sim.ta_shadownet_commands", "tee_sim.attestation", "tee_sim.registry"},
    "models": {"numpy", "tensorflow", "keras", "sklearn", "ai_edge_litert", "shadownet.exceptions",
               "shadownet.files"},
}


def module_imports(source: str) -> set[str]:
    """Every module ``source`` imports by absolute name, function-level imports included; ``from tee_sim
    import secure_os`` counts ``tee_sim`` and, being a module of ours, ``tee_sim.secure_os``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if source_of(f"{node.module}.{alias.name}") is not None)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def source_of(module: str) -> Path | None:
    """The source file of one of our modules (a package's ``__init__.py``), None if it is not ours."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(source: str, package: str) -> set[str]:
    """The modules ``source`` (a file of ``package``) imports from outside it: ours by full name, others by
    their top-level name; not the standard library's."""
    found = set()
    for name in module_imports(source):
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top != package:
            found.add(name if top in OURS else top)
    return found


def imports(package: str) -> dict[str, set[str]]:
    """{imported module: files of ``package`` that import it}."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported(path.read_text(), package):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_its_trust_domain_may(package):
    found = imports(package)
    assert found, f"no imports found in {package}: the scan is not reading it"
    foreign = {name: sorted(files) for name, files in found.items() if name not in ALLOWED[package]}
    assert not foreign, f"{package} imports outside its trust domain: {foreign}"


def test_the_scan_sees_function_level_imports_and_submodules():
    """The runtime imports the converter (its artifact names at module level, the rest inside functions);
    the scan must see it, and a submodule imported by ``from package import module`` is named as the
    module."""
    assert any(name.startswith("converters") for name in imports("shadownet"))
    source = "def f():\n    from tee_sim import secure_os, TempMemRef\n    import numpy.linalg, json\n"
    assert imported(source, "converters") == {"tee_sim", "tee_sim.secure_os", "numpy"}
    assert "tee_sim.secure_os" not in ALLOWED["converters"]
