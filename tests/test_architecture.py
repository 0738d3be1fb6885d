"""The seams: layering of the package's imports, and extending it with a new method or dataset
from outside the package (two files each), composed and trained through train.py."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cdep_exp"
PLUGINS = Path(__file__).parent / "plugins"

# Which top-level parts of the package each part may import (besides itself). Data flows
# forward: config → data → model → penalty → loop → scoring → run record → reporting.
LOWER = {"errors", "atomic", "provenance"}
ALLOWED = {
    "cd": LOWER,
    "data": LOWER,
    "models": LOWER | {"cd"},  # models register their own whole-model CD rules
    "penalties": LOWER | {"cd", "models", "data"},  # data: the batch helpers (token deletion)
    "feature_cache": LOWER | {"cd", "data"},
    "scoring": LOWER | {"data"},
    "training": LOWER | {"penalties", "scoring"},
    "run": LOWER | {"data", "models", "cd", "penalties", "feature_cache", "scoring", "training"},
    # Reporting reads records and composes table presets (the trainer schema must be registered).
    "reporting": LOWER | {"run", "training"},
    # Tools rebuild a run from its record and inspect the trained model.
    "tools": LOWER | {"cd", "data", "models", "penalties", "run", "scoring"},
    "errors": set(),
    "atomic": {"errors"},
    "provenance": {"errors"},
}
# The package root: the lowest layer and the feature cache; everything else lives in a subpackage.
ROOT_MODULES = {"__init__", "errors", "atomic", "provenance", "feature_cache"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_parts(path: Path) -> set[str]:
    """Top-level parts of cdep_exp that a module imports (cdep_exp.<part>...), relative imports
    and importlib.import_module("cdep_exp....") calls included."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        parts |= {n.split(".")[1] for n in names if n.startswith("cdep_exp.")}
    return parts


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def test_the_allowed_layers_form_no_cycle() -> None:
    """Layers may only point down: a topological order of ALLOWED must exist."""
    remaining = {part: set(deps) - {part} for part, deps in ALLOWED.items()}
    while remaining:
        free = [part for part, deps in remaining.items() if not deps & set(remaining)]
        assert free, f"cycle among {sorted(remaining)}"
        for part in free:
            del remaining[part]


def test_every_module_imports_only_lower_layers() -> None:
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part == "__init__":  # the package's own __init__ may import nothing of the package
            assert not imported_parts(path), "cdep_exp/__init__.py imports the package"
            continue
        assert part in ALLOWED, f"{path.relative_to(ROOT)}: a new part of the package; add it to ALLOWED"
        for target in imported_parts(path) - {part}:
            if target not in ALLOWED[part]:
                offences.append(f"{path.relative_to(ROOT)} imports cdep_exp.{target}")
    assert not offences, offences


def test_the_package_root_holds_only_the_lowest_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules <= ROOT_MODULES and len(modules) <= 8, sorted(modules - ROOT_MODULES)


def module_edges() -> dict[str, set[str]]:
    """Module → the package's modules it imports (a `from package import name` counts as
    importing the module `package.name` when there is one, else the package)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cdep_exp"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        edges[name] = {t for t in targets if t in modules and t != name and t != package}
    return edges


def test_no_two_modules_import_each_other() -> None:
    """No import cycle between modules: a topological order of the import graph exists (a
    package's own __init__, which gathers its modules, is not counted as a dependency of them)."""
    remaining = module_edges()
    while remaining:
        free = [m for m, deps in remaining.items() if not deps & set(remaining)]
        assert free, f"import cycle among {sorted(remaining)}"
        for m in free:
            del remaining[m]


def test_layer_rules_catch_an_upward_import() -> None:
    module = PACKAGE / "data" / "_probe_bad_import.py"
    module.write_text("from cdep_exp.run.app import run\nimport cdep_exp.models.vgg\nfrom ..penalties import CDEP\n"
                      "importlib.import_module('cdep_exp.training')\n")
    try:
        assert imported_parts(module) == {"run", "models", "penalties", "training"}
        assert not {"run", "models", "penalties", "training"} & ALLOWED["data"]
    finally:
        module.unlink()


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), f"hydra.searchpath=[file://{PLUGINS / 'conf'}]",
               f"paths.root_dir={tmp_path}", "trainer.progress=false", "trainer.max_epochs=1", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{PLUGINS.parent}"}
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_a_new_dataset_and_a_new_method_are_two_files_each(tmp_path: Path) -> None:
    assert sorted(p.name for p in PLUGINS.rglob("*") if p.is_file() and p.suffix in {".py", ".yaml"}
                  and p.name != "__init__.py") == ["blobs.yaml", "dummy.yaml", "dummy_data.py", "dummy_penalty.py"]
    done = train(tmp_path, "dataset=blobs", "method=dummy")
    assert done.returncode == 0, done.stderr[-2000:]
    [record_path] = (tmp_path / "outputs").rglob("metrics.json")
    record = json.loads(record_path.read_text())
    assert record["method"] == "dummy" and record["lam"] == 0.5 and record["dataset"] == "blobs"
    assert record["config"]["model"]["in_features"] == 5 and record["config"]["model"]["num_classes"] == 2
    assert record["history"][0]["penalty"] > 0


@pytest.mark.parametrize("method", ["vanilla", "cdep", "rrr", "eg"])
def test_the_new_dataset_trains_with_every_built_in_method(tmp_path: Path, method: str) -> None:
    done = train(tmp_path, "dataset=blobs", f"method={method}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_model_that_does_not_fit_the_data_fails_in_one_line(tmp_path: Path) -> None:
    done = train(tmp_path, "dataset=blobs", "method=vanilla", "model.num_classes=3")
    assert done.returncode != 0
    assert "model.num_classes=2" in done.stderr and "Traceback" not in done.stderr


def test_a_method_that_cannot_apply_fails_in_one_line_without_a_lambda_warning(tmp_path: Path) -> None:
    # The new dataset only marks where its feature is, so logit pairing cannot apply: the one-line
    # error, and no advice to sweep the λ of a run that cannot train.
    done = train(tmp_path, "dataset=blobs", "method=clp")
    assert done.returncode != 0 and "cannot build them" in done.stderr
    assert "never tuned" not in done.stdout + done.stderr and "Traceback" not in done.stderr
