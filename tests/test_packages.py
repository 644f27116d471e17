"""The packages keep to their trust domains (ARCHITECTURE.md's "may import" column), read from every import
statement in their source, function-level ones included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"models", "converters", "tee_sim", "shadownet"}
# What each package may import besides the standard library and itself. tee_sim publishes a few modules
# to the vendor's converter, as OP-TEE publishes a TA's header and its attestation protocol; every package
# raises the one flat module of exceptions.
ALLOWED = {
    "tee_sim": {"numpy", "cryptography", "ai_edge_litert"},
    "converters": {"numpy", "ai_edge_litert", "flatbuffers", "cryptography", "tensorflow", "keras",
                   "shadownet.exceptions", "tee_sim", "tee_sim.program", "tee_sim.ta_shadownet_commands",
                   "tee_sim.attestation", "tee_sim.registry"},
    "models": {"numpy", "tensorflow", "keras", "sklearn", "ai_edge_litert", "shadownet.exceptions"},
}


def imports(package: str) -> dict[str, set[str]]:
    """{imported module (ours by full name, others by their top-level name): files that import it}."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == package:
                    continue
                found.setdefault(name if top in OURS else top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_its_trust_domain_may(package):
    found = imports(package)
    assert found, f"no imports found in {package}: the scan is not reading it"
    foreign = {name: sorted(files) for name, files in found.items() if name not in ALLOWED[package]}
    assert not foreign, f"{package} imports outside its trust domain: {foreign}"


def test_the_scan_sees_function_level_imports():
    """The runtime imports the converter inside functions only; the scan must still see it."""
    assert any(name.startswith("converters") for name in imports("shadownet"))
