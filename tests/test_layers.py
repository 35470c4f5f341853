"""Imports point one way. Each folder of the package is a layer and may import only its own
folder and the layers below it (README, "Layout"):

    ltp_compress.errors, ltp_compress.fileio   base: no package imports
    kernels/      INT8 GEMMs, token packing                    -> base
    tasks/        GLUE tasks, data, metrics                    -> base
    modeling/     pruned encoder, INT8 model, checkpoints, cost model (accounting) -> kernels, tasks, base
    stages/       one function per stage, stage configs        -> modeling, kernels, tasks, base
    pipeline/     recipe, runner, run folder, reports, CLI, bench, sweep -> everything below
    ltp_compress/__init__.py  the public facade (`ltp_compress.load`) -> anything
    benchmarks/   scripts (not installed) and their shared _harness.py -> the package; never imported by it

Every import statement counts, also those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYER = {"base": 0, "kernels": 1, "tasks": 1, "modeling": 2, "stages": 3, "pipeline": 4, "facade": 5, "benchmarks": 6}
FOLDERS = ("kernels", "tasks", "modeling", "stages", "pipeline")
# the scripts import each other by bare name (their folder is on sys.path): `from _harness import ...`
BENCHMARK_MODULES = {p.stem for p in (REPO / "benchmarks").glob("*.py")}


def _unit(module: str) -> str | None:
    """Layer unit of a module name (None: not ours)."""
    parts = module.split(".")
    if parts[0] == "benchmarks" or (len(parts) == 1 and parts[0] in BENCHMARK_MODULES):
        return "benchmarks"
    if parts[0] != "ltp_compress":
        return None
    if len(parts) == 1:
        return "facade"
    if parts[1] in FOLDERS:
        return parts[1]
    return "base"  # ltp_compress.errors, ltp_compress.fileio


def _source_files() -> list[tuple[str, Path]]:
    """(package the file is in, path) for every module, sub-packages (e.g. pipeline/peers/) included."""
    files = []
    for folder in FOLDERS:
        for p in sorted((REPO / folder).rglob("*.py")):
            sub = p.parent.relative_to(REPO / folder).parts
            files.append((".".join(("ltp_compress", folder, *sub)), p))
    files += [("ltp_compress", p) for p in sorted((REPO / "ltp_compress").glob("*.py"))]
    files += [("benchmarks", p) for p in sorted((REPO / "benchmarks").glob("*.py"))]
    return files


def _module_name(package: str, path: Path) -> str:
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def _imports(package: str, path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
    return out


def test_every_package_folder_is_scanned():
    scanned = {p.relative_to(REPO).parts[0] for _, p in _source_files()}
    assert scanned == set(FOLDERS) | {"ltp_compress", "benchmarks"}
    assert "_harness" in BENCHMARK_MODULES
    assert len(_source_files()) > 30


@pytest.mark.parametrize("package,path", _source_files(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_imports_point_down(package, path):
    me = _unit(_module_name(package, path))
    if package == "ltp_compress" and path.stem != "__init__":
        me = "base"
    bad = []
    for line, name in _imports(package, path):
        other = _unit(name)
        if other is None or other == me:
            continue
        if LAYER[other] >= LAYER[me]:
            bad.append(f"{path.relative_to(REPO)}:{line}: {me} imports {name} ({other})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """Negative control: a stage module importing the runner is reported."""
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from ltp_compress.pipeline.runner import run_recipe\n")
    names = [n for _, n in _imports("ltp_compress.stages", f)]
    assert names == ["ltp_compress.pipeline.runner"]
    assert LAYER[_unit(names[0])] > LAYER[_unit("ltp_compress.stages.bad")]


def test_the_check_catches_the_package_importing_a_benchmark(tmp_path):
    """Negative control: a pipeline module importing the benchmarks' harness points up; a script
    importing the package points down."""
    f = tmp_path / "bad.py"
    f.write_text("from _harness import dev_feeds\nimport benchmarks.gemm_bench\n")
    names = [n for _, n in _imports("ltp_compress.pipeline", f)]
    assert [_unit(n) for n in names] == ["benchmarks", "benchmarks"]
    assert all(LAYER[_unit(n)] > LAYER[_unit("ltp_compress.pipeline.bad")] for n in names)
    assert LAYER[_unit("ltp_compress.pipeline.bench")] < LAYER[_unit("benchmarks.gemm_floor")]
