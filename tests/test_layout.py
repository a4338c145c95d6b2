"""The package's layers (README.md, Layout): no module imports one of a layer above its own.

Every `import` and `from ... import` of every module is read with `ast` (those inside functions too:
a lazy import is still a dependency), so the rules hold for the code as written, not only for what
one test run happens to import.
"""

import ast
from pathlib import Path

import pytest

import lorabench

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"lorabench": ROOT / "lorabench", "lorabench.kernels": ROOT / "kernels"}

# Lowest first. A module may import its own layer and those below; `lorabench.outputs.results`
# (atomic writes, read_table) is a leaf every layer that writes files uses: it imports only errors.
LAYERS = (
    ("base", ("lorabench.errors", "lorabench.outputs.results", "lorabench.presets", "lorabench.parallel",
              "lorabench.kernels")),
    ("inputs", ("lorabench.workload", "lorabench.traces", "lorabench.strategies", "lorabench.adapters")),
    ("core", ("lorabench.compress", "lorabench.model", "lorabench.sim")),
    ("outputs", ("lorabench.outputs",)),
    ("evaluation", ("lorabench.quality",)),
    ("experiments", ("lorabench.experiments",)),
    ("tools", ("lorabench.fidelity", "lorabench.kernelbench")),
    ("commands", ("lorabench.cli", "lorabench.__main__")),
)


def module_name(path: Path) -> str:
    for package, folder in SOURCES.items():
        if folder in path.parents:
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join((package, *parts)).removesuffix(".__init__")
    raise AssertionError(path)


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific prefix that names `module` (None: not lorabench's)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lorabench import in a file; `from lorabench import x` counts as
    lorabench.x when x is a submodule."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "lorabench":
                found += [(node.lineno, f"lorabench.{a.name}") for a in node.names if is_submodule(a.name)]
    return [(line, m) for line, m in found if m == "lorabench" or m.startswith("lorabench.")]


def is_submodule(name: str) -> bool:
    return name == "kernels" or any((SOURCES["lorabench"] / n).exists() for n in (name, f"{name}.py"))


def package_files() -> list[Path]:
    return sorted(p for folder in SOURCES.values() for p in folder.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in package_files()
                if module_name(p) != "lorabench" and layer_of(module_name(p)) is None]
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer():
    offences = []
    for path in package_files():
        here = module_name(path)
        if here == "lorabench":  # the lazy import surface names every layer on purpose
            continue
        for line, target in imports_of(path):
            if target == "lorabench":
                continue
            assert layer_of(target) is not None, f"{path}:{line} imports {target}, which is in no layer"
            if layer_of(target) > layer_of(here):
                offences.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer_of(here)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]})")
    assert not offences, "\n".join(offences)


def test_the_shared_leaf_imports_only_errors():
    path = SOURCES["lorabench"] / "outputs" / "results.py"
    assert {m for _, m in imports_of(path)} <= {"lorabench.errors"}


def test_internal_modules_do_not_use_the_lazy_surface():
    """Inside the package, names come from their modules: `from lorabench import RunConfig` would make
    the import graph depend on lorabench/__init__.py's table."""
    used = []
    for path in package_files():
        if module_name(path) == "lorabench":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lorabench":
                used += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                         if a.name != "__version__" and not is_submodule(a.name)]
    assert not used, used


def test_the_layer_rules_catch_an_upward_import(tmp_path):
    """The checker itself: a sim module importing an experiment is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lorabench.experiments.runner import RunConfig\n")
    (line, target), = imports_of(bad)
    assert line == 2 and layer_of(target) > layer_of("lorabench.sim.engine")
    assert layer_of("lorabench.outputs.results") < layer_of("lorabench.adapters.peft") < layer_of("lorabench.sim")


@pytest.mark.parametrize("name", lorabench.__all__)
def test_the_public_surface_resolves(name):
    assert getattr(lorabench, name) is not None


def test_importing_the_package_and_run_config_loads_neither_torch_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys; from lorabench import RunConfig, run_experiment, run_sweep, read_sweep; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
