"""The import layering of `distsft/` (issue 21: no circle, no import running up).

Every module of the package sits on a floor of `FLOORS` and imports only modules on lower floors: at the top
of the file, inside a function (a deferred import is still an arrow), under `TYPE_CHECKING` and in an
`if __name__ == "__main__"` block alike. The graph is read from the source with `ast`, nothing is imported.
A new module gets a floor here, with the reason it sits there; an import that needs a module to move up
means the code is in the wrong room.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distsft"

FLOORS: dict[str, int] = {
    # 0: leaves, importing nothing of distsft: how a process ends, logging, secrets, dtype names, FLOP
    # counts, plots, packed attention, the kernel census; the data reports and the batch order; ZeRO-3's host
    # fast paths.
    "distsft": 0,  # the package: `distsft.train` resolves lazily (importlib), by name
    "distsft.lifecycle": 0,
    "distsft.logs": 0,
    "distsft.redaction": 0,
    "distsft.dtypes": 0,
    "distsft.flops": 0,
    "distsft.plots": 0,
    "distsft.attention": 0,
    "distsft.census": 0,
    "distsft.data.report": 0,
    "distsft.data.sampler": 0,
    # 1: the typed config (reads only redaction, to write config.yaml); checkpoints (the lifecycle's test hook);
    # ZeRO-3's host fast paths (DeepSpeed's internals, and the census they count into).
    "distsft.config": 1,
    "distsft.checkpoint": 1,
    "distsft.zero3_host": 1,
    # 2: rooms that take their sub-config: process groups and DeepSpeed, trackers, optimizer, loss, 4-bit,
    # recomputation; where data comes from and what its rows look like.
    "distsft.distributed": 2,
    "distsft.tracking": 2,
    "distsft.optim": 2,
    "distsft.loss": 2,
    "distsft.qlora": 2,
    "distsft.recompute": 2,
    "distsft.data.sources": 2,
    "distsft.data.formats": 2,
    # 3: throughput (counts targets with loss), the fused LoRA projections, chat templates.
    "distsft.progress": 3,
    "distsft.fused_lora": 3,
    "distsft.data.templates": 3,
    # 4: our kernels bound into a model instance; tokenization and label masks; the demo data.
    "distsft.patching": 4,
    "distsft.data.tokenization": 4,
    "distsft.data.tiny": 4,
    # 5: the model and its loss wrapper; the tokenization cache; packing.
    "distsft.model": 5,
    "distsft.data.cache": 5,
    "distsft.data.packing": 5,
    # 6: the data pipeline as a whole; export (adapter, merge); the checks before a run.
    "distsft.data": 6,
    "distsft.export": 6,
    "distsft.preflight": 6,
    # 7: generation from an adapter; a training process's command line and exit code; `python -m distsft.data`.
    "distsft.inference": 7,
    "distsft.entry": 7,
    "distsft.data.__main__": 7,
    # 8: the loop.
    "distsft.train": 8,
    # 9: the `distsft` command, a leaf: nothing in the library imports it; 10: `python -m distsft`.
    "distsft.cli": 9,
    "distsft.__main__": 10,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The distsft modules `name` imports, anywhere in its source. `from distsft import census` imports
    `distsft.census`; `from distsft.data import collate` imports `distsft.data`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known]
            targets = targets or [module]
        else:
            continue
        for target in targets:
            while target and target not in known:  # distsft.data.sources.open_source -> distsft.data.sources
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `g`, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_every_module_has_a_floor():
    mods = set(modules())
    assert not mods - FLOORS.keys(), f"modules without a floor in FLOORS: {sorted(mods - FLOORS.keys())}"
    assert not FLOORS.keys() - mods, f"FLOORS names modules that do not exist: {sorted(FLOORS.keys() - mods)}"


def test_no_import_cycle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_imports_run_down_only():
    upward = [f"{a} (floor {FLOORS[a]}) imports {b} (floor {FLOORS[b]})"
              for a, targets in sorted(graph().items()) for b in sorted(targets) if FLOORS[b] >= FLOORS[a]]
    assert not upward, "imports that do not run down:\n" + "\n".join(upward)


def test_the_command_is_a_leaf():
    """Only `python -m distsft` imports the `distsft` command (the training process's entry is distsft.entry)."""
    assert {a for a, targets in graph().items() if "distsft.cli" in targets} == {"distsft.__main__"}


def test_the_checker_sees_deferred_and_upward_imports(tmp_path, monkeypatch):
    """The test itself: an import inside a function is an arrow, and one running up (or round) is caught."""
    pkg = tmp_path / "distsft"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from distsft.train import main\n")
    (pkg / "train.py").write_text("from distsft import config\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    g = graph()
    assert g == {"distsft": set(), "distsft.config": {"distsft.train"}, "distsft.train": {"distsft.config"}}
    assert cycle(g) in (["distsft.config", "distsft.train", "distsft.config"],
                        ["distsft.train", "distsft.config", "distsft.train"])
    assert FLOORS["distsft.train"] >= FLOORS["distsft.config"]  # so test_imports_run_down_only names it
