"""The engine's layout: four subpackages that import downwards only, and never ComfyUI."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "nextstep_core"
RANK = {"model": 0, "weights": 1, "generation": 2, "frontend": 3}  # a package may import those of lower rank
TOP_LEVEL = {"errors", "__init__", "__main__"}


def _imports(path: pathlib.Path):
    """(line, target package) of every relative import, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    here = path.relative_to(ROOT).parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in skip:
            base = list(here[:-1])[:len(here) - node.level]
            target = base + (node.module.split(".") if node.module else [])
            yield node.lineno, (target or [n.name for n in node.names])[0]


def test_subpackages_import_downwards_only():
    wrong = []
    for path in ROOT.rglob("*.py"):
        own = path.relative_to(ROOT).parts[0]
        if own not in RANK:
            continue
        for line, target in _imports(path):
            if target in RANK and RANK[target] > RANK[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong


def test_the_engine_never_imports_comfyui():
    names = {"comfy", "folder_paths", "server", "nodes", "comfy_api", "comfy_execution"}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & names, path
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert node.module.split(".")[0] not in names, path


def test_pip_install_ships_every_subpackage():
    """`pip install .` (setuptools' package discovery in pyproject.toml) includes every folder of the engine."""
    import fnmatch

    tomllib = __import__("pytest").importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {".".join(p.relative_to(ROOT.parent).parts[:-1]) for p in ROOT.rglob("__init__.py")}
    assert packages >= {"nextstep_core", "nextstep_core.model", "nextstep_core.generation", "nextstep_core.weights",
                        "nextstep_core.frontend"}
    assert all(any(fnmatch.fnmatch(p, pattern) for pattern in include) for p in packages)
