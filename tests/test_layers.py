"""The package's layers import one way: `method/` is the bottom, `longrun/` builds on it, the trainer composes both."""

import ast
from pathlib import Path

import pytest

import vppo_trl

pytestmark = pytest.mark.transformers_independent

PACKAGE = Path(vppo_trl.__file__).parent

# What each layer may not import: anything above it in docs/design.md's table.
FORBIDDEN_ABOVE = {
    "method": ("vppo_trl.longrun", "vppo_trl.trainer", "vppo_trl.tools", "vppo_trl.train", "vppo_trl.testing"),
    "longrun": ("vppo_trl.trainer", "vppo_trl.tools", "vppo_trl.train", "vppo_trl.testing"),
}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module `source` (a module of `package`) imports, absolute: relative imports resolved against `package`."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            modules.add(module)
            modules.update(f"{module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_ABOVE))
def test_a_layer_imports_nothing_above_it(layer):
    crossings = {
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for module in imported_modules(path.read_text(), f"vppo_trl.{'.'.join(path.relative_to(PACKAGE).parts[:-1])}")
        if module.startswith(FORBIDDEN_ABOVE[layer])
    }
    assert crossings == set()


def test_the_import_reader_sees_a_crossing():
    """The check above can fail: a relative import one level up is resolved to the module it names."""
    source = "from ..longrun.guards import NonFiniteLossGuardMixin\nfrom . import core\nimport vppo_trl.trainer\n"
    modules = imported_modules(source, "vppo_trl.method")
    assert {"vppo_trl.longrun.guards", "vppo_trl.method.core", "vppo_trl.trainer"} <= modules
