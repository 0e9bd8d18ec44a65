"""The README as a newcomer uses it: every Python block runs as written, commands write into
``pytei-out/`` (which git ignores), and the set-up commands are the main job and CI's command."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pytei

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: Put this line (with a reason) right above a Python block that cannot run here.
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")


def python_blocks() -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason)`` of every ```python block of README.md."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```", README, re.S):
        before = README[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.match(before.strip())
        out.append((README.count("\n", 0, m.start()) + 1, m.group(1), skip.group(1) if skip else None))
    return out


def example_containing(code: str) -> Path | None:
    """The file under examples/ that holds ``code`` verbatim (its own tests run it), if any."""
    return next((p for p in sorted((ROOT / "examples").rglob("*.py")) if code in p.read_text()), None)


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize(("line", "code", "skip"), BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_python_block_runs_as_written(line, code, skip, tmp_path, monkeypatch):
    """Each block runs alone, in a fresh namespace, in an empty folder (what it writes stays there).

    A block that is an excerpt of a file under examples/ (the "Extending pytei" section) is that
    file's code, which its own test runs end to end (tests/test_extending.py)."""
    if skip:
        pytest.skip(f"README line {line}: {skip}")
    example = example_containing(code)
    if example is not None:
        assert "import" in example.read_text()  # the file is complete; the block is a verbatim part
        return
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - our own documentation


def test_injection_example_writes_into_pytei_out(tmp_path, monkeypatch, capsys):
    line, code, _ = next(b for b in BLOCKS if "pytei.inject(model" in b[1] and "fault_map.save" in b[1])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "pytei-out" / "trial.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["pytei-out"]
    report = namespace["report"]
    assert report.n_faults == sum(report.per_parameter.values()) > 0
    assert "InjectionReport(" in capsys.readouterr().out


def test_mitigation_example_defines_its_batches_and_counts_detections():
    line, code, _ = next(b for b in BLOCKS if "clean_batches" in b[1])
    namespace: dict = {}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    stats = namespace["abft"].stats
    assert stats["checked"] > 0 and stats["false_alarms"] == 0
    assert namespace["clip"] is not None


def test_custom_error_model_example():
    block = next(code for _, code, _ in BLOCKS if "TopExponentBit" in code)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own documentation
    model = nn.Linear(64, 64)
    before = model.weight.detach().clone()
    with pytei.inject(model, namespace["TopExponentBit"](0.1), params="weight", seed=0) as report:
        changed = model.weight.detach() != before
        assert report.n_faults == int(changed.sum()) > 0
        assert report.per_bit("weight")[30] == report.n_faults  # float32: highest exponent bit is 30
    assert torch.equal(model.weight.detach(), before)


def test_setup_commands_match_ci():
    """The README's two set-up commands: the main job is the quick reproduction without the dev
    extras, and the test command is exactly what ``.ci/run`` runs."""
    main_job, tests = re.findall(r"```bash\n(.*?)\n```", README, re.S)[:2]
    assert main_job == "pip install -c constraints.txt -e . && pytei reproduce --preset quick"
    assert tests == (
        'pip install -c constraints.txt -e ".[dev,torchrec]"'
        " && pip install -c constraints.txt --no-deps torchrec && ruff check . && mypy && python -m pytest -q"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_commands_write_into_pytei_out_which_git_ignores():
    """No README command writes checkpoints, databases, exports or reports into the repository."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "pytei-out/" in ignored or "/pytei-out/" in ignored
    outputs = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("#", 1)[0]
            if not command.strip().startswith(("pytei ", "PYTHONPATH=")):
                continue
            outputs += re.findall(r"--(?:out|db)[ =](\S+)", command)
            if " reproduce" in command:
                assert "--out" not in command or "--out pytei-out" in command, command
    assert len(outputs) >= 6, outputs
    for path in outputs:
        assert path.startswith("pytei-out/"), f"README command writes {path} outside pytei-out/"


def test_reproduce_writes_into_pytei_out_by_default():
    from pytei.cli import build_parser

    args = build_parser().parse_args(["reproduce"])
    assert args.out == "pytei-out" and args.preset == "quick"


# --- the main job needs only the runtime dependencies ---------------------------------------------

#: Optional extras: imported only inside functions that say how to install them.
OPTIONAL = {"ray": "ray", "pyarrow": "parquet", "torchrec": "torchrec", "fbgemm_gpu": "torchrec"}
#: Optional modules installed apart from their extra: torchrec declares the CUDA fbgemm-gpu, so it goes in
#: with ``pip install --no-deps`` (README's test command) and its extra brings the rest.
APART = {"torchrec"}


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """``(top-level module, at module level?)`` of every absolute import in ``tree``."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module.split(".")[0], top))
            visit(child, inner)

    visit(tree, True)
    return out


def _type_checking_only(path: Path, module: str) -> bool:
    """Whether every module-level import of ``module`` in ``path`` sits under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    guarded = [
        node
        for block in tree.body
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for node in ast.walk(block)
    ]
    top = [
        node
        for block in tree.body
        if not (isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING")
        for node in ast.walk(block)
        if not isinstance(block, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    named = [n for n in top if isinstance(n, ast.Import | ast.ImportFrom) and _names(n, module)]
    return bool(guarded) and not named


def _names(node: ast.Import | ast.ImportFrom, module: str) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.module) and node.level == 0 and node.module.split(".")[0] == module
    return any(a.name.split(".")[0] == module for a in node.names)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_package_imports_only_its_runtime_dependencies():
    """`pip install -e .` (no extras) is enough for the main job: every third-party module the
    package imports belongs to a runtime dependency; ray and pyarrow only inside functions."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()
    }
    distributions = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    for path in sorted((ROOT / "src" / "pytei").rglob("*.py")):
        for module, top in _imports(ast.parse(path.read_text(), str(path))):
            if module in stdlib or module in ("pytei", "__future__"):
                continue
            if module in OPTIONAL:
                assert not top or _type_checking_only(path, module), (
                    f"{path.name} imports the optional {module} at module level"
                )
                dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
                assert module in APART or dists & extras[OPTIONAL[module]], (module, dists)
                continue
            dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            assert dists & runtime, f"{path.relative_to(ROOT)} imports {module}, not a runtime dependency"
