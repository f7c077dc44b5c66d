"""The package's shape: stages import only the stages below them (the import-linter contract in
pyproject.toml), no module imports another's private names, and no two modules import each other, even
from inside a function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "compressor"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(module, name or "", line)`` for every ``compressor`` import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "compressor":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "compressor"]
    return found


def test_stages_import_only_the_stages_below_them():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([str(lint)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    bad = [f"{path.relative_to(REPO)}:{line} imports {name} from {module}"
           for mod, path in modules.items() for module, name, line in _imports(path, modules)
           if name.startswith("_") and not name.startswith("__") and module != mod]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    modules = _modules()
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    graph = {m: sorted({target for target, _, _ in _imports(p, modules)
                        if target in modules and target not in packages and target != m})
             for m, p in modules.items() if m not in packages}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


# What data/ may use of the package: errors, files, forward hooks (perplexity reads the head's input) and its
# own modules. The calibrated analysis (whitening, statistics, refits: core.svd, core.handlers, core.policies
# and up) lives in analysis/, not data/.
DATA_MAY_IMPORT = ("compressor.core.errors", "compressor.core.fileio", "compressor.core.hooks", "compressor.data.")


def test_data_holds_inputs_and_loaders_not_algorithms():
    modules = _modules()
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for mod, path in modules.items() if mod.startswith("compressor.data")
           for module, _name, line in _imports(path, modules) if not module.startswith(DATA_MAY_IMPORT)]
    assert not bad, "\n".join(bad)


def test_no_type_check_of_a_policy_outside_the_policy_module():
    """What the analysis needs of a policy is an attribute (``core.policies.across_layers``, ``spectral``), so
    a policy a user registers behaves as the built-in ones: no ``isinstance(x, ...Policy)`` elsewhere."""
    bad = []
    for mod, path in _modules().items():
        if mod == "compressor.core.policies":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and len(node.args) == 2 and "Policy" in ast.unparse(node.args[1])):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, "\n".join(bad)


def test_one_way_into_onnxruntime():
    """Sessions are opened by ``compressor.formats.runtime.session`` alone (its provider, log level and threads
    decided once); everything else calls it."""
    bad = [f"{path.relative_to(REPO)}:{node.lineno}" for mod, path in _modules().items()
           if mod != "compressor.formats.runtime"
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("ort.InferenceSession")]
    assert not bad, "\n".join(bad)


# Modules a reader can follow top to bottom: none over MAX_MODULE_LINES lines and no function over
# MAX_FUNCTION_LINES anywhere in compressor/ (issue 26). No exceptions today; one would be listed here with
# its reason.
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 100
EXCEPTIONS: dict[str, str] = {}  # "path" or "path:function" -> why it is longer


def test_modules_and_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text, where = path.read_text(), str(path.relative_to(REPO))
        if len(text.splitlines()) > MAX_MODULE_LINES and where not in EXCEPTIONS:
            long.append(f"{where}: {len(text.splitlines())} lines")
        long += [f"{where}:{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
                 for node in ast.walk(ast.parse(text))
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                 and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
                 and f"{where}:{node.name}" not in EXCEPTIONS]
    assert not long, "split these at a seam, or list them in EXCEPTIONS with the reason:\n" + "\n".join(long)


# Forward hooks are registered by compressor.core.hooks alone (capture, stop early, patched forwards), where
# every handle is removed on leaving; the exceptions, with the reason each stays as it is:
HOOKS_MAY_REGISTER = {
    "compressor.core.hooks": "the one place",
    # Its pre-hooks read the tensors outside the blocks (embeddings, head) when a module holding them first
    # runs, for as long as the streamed skeleton lives: no ``with`` to leave, nothing to remove.
    "compressor.analysis.blocks": "permanent loading hooks on the streamed skeleton",
}


def test_forward_hooks_are_registered_in_core_hooks():
    bad = [f"{path.relative_to(REPO)}:{node.lineno}" for mod, path in _modules().items()
           if mod not in HOOKS_MAY_REGISTER
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Attribute) and node.attr in ("register_forward_hook", "register_forward_pre_hook")]
    assert not bad, "use compressor.core.hooks (or list the module in HOOKS_MAY_REGISTER with why):\n" + "\n".join(bad)
