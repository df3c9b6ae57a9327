"""The Triton kernels are the package `distsft_kernels` in `kernels/distsft_kernels/`; the top-level `kernels/`
folder holds no `__init__.py`, so it never shadows the PyPI package `kernels` (DESIGN.md naming hazard),
which transformers and bitsandbytes import when it is present, not even with the repository root first on
sys.path: `python -m pytest` from the root, scripts run from it."""

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = REPO / "kernels" / "distsft_kernels"

PROBE = """
import sys
sys.path.insert(0, {repo!r})  # the worst case: the repository root first on sys.path (python -m, scripts)
try:
    import kernels
except ImportError as e:
    print("IMPORTERROR", e)
else:
    print("FILE", getattr(kernels, "__file__", None))
from transformers.utils import import_utils
print("AVAILABLE", import_utils.is_kernels_available())
import distsft_kernels
print("DISTSFT_KERNELS", distsft_kernels.__file__)
"""


def _probe() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO))], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def _installed_kernels() -> bool:
    """The PyPI `kernels` is installed (found on sys.path without the repository root)."""
    path = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    return spec is not None and spec.origin is not None


def test_the_kernels_folder_is_not_a_package():
    """The root offers `kernels` only as a namespace portion, which any installed `kernels` beats whatever
    the order of sys.path, and which transformers reads as absent."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(REPO)])
    assert spec is not None and spec.origin is None and spec.loader is None  # a namespace portion only
    assert (OURS / "__init__.py").is_file()


def test_import_kernels_does_not_resolve_to_our_folder():
    """Also the regression for the GPU machine's crash: transformers 5.17 imports `kernels` when it finds
    one on sys.path without metadata, so what the root offers under that name must import cleanly."""
    lines = _probe()
    if _installed_kernels():  # the PyPI package wins over the namespace portion
        assert not Path(lines["FILE"]).resolve().is_relative_to(REPO), lines
    else:  # absent, or the root's folder as an empty namespace package: absent for transformers
        assert "IMPORTERROR" in lines or lines["FILE"] == "None", lines
        assert lines["AVAILABLE"] == "False", lines
    # editable install: our folder; regular install: site-packages/distsft_kernels
    assert Path(lines["DISTSFT_KERNELS"]).resolve().parent.name == "distsft_kernels"


def test_import_view_of_this_process():
    """Whichever way pytest started: `kernels` is never our folder, `distsft_kernels` is our package. Run by
    the next test under `python -m pytest` from the root, where the root is on sys.path."""
    import distsft_kernels

    if os.environ.get("DISTSFT_EXPECT_ROOT_ON_PATH"):
        assert any(Path(p or ".").resolve() == REPO for p in sys.path), sys.path
    try:
        import kernels
    except ImportError:
        kernels = None
    where = getattr(kernels, "__file__", None)
    assert where is None or not Path(where).resolve().is_relative_to(REPO), where
    assert Path(distsft_kernels.__file__).resolve().parent.name == "distsft_kernels"


def test_python_m_pytest_from_the_repository_root():
    """`python -m pytest` from the root (the root first on sys.path) imports what `pytest` does."""
    env = {**os.environ, "DISTSFT_EXPECT_ROOT_ON_PATH": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{Path(__file__).relative_to(REPO)}::test_import_view_of_this_process"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def _requirements() -> dict:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


# The private APIs distsft touches, per package with an upper bound in pyproject.toml: a release inside the
# bounds that drops one fails here, not in the middle of a run.
PRIVATE_APIS = {
    "deepspeed": ["deepspeed.utils.tensor_fragment:tensor_fragment.hp_fragment_address",
                  "deepspeed.utils.tensor_fragment:tensor_fragment.lp_fragment_address",
                  "deepspeed.utils.tensor_fragment:get_hp_fragment_mapping"],
    "transformers": ["transformers.integrations.deepspeed:_hf_deepspeed_config_weak_ref",
                     "transformers.initialization:guard_torch_init_functions"],
    "bitsandbytes": ["bitsandbytes.functional:_convert_weight_packed_for_cpu_inverse"],
}


def test_dependencies_whose_private_api_we_touch_are_bounded_and_installed_within():
    """deepspeed (ZeRO-1/2 fragment mappings), transformers (its DeepSpeed weak reference) and bitsandbytes
    (its CPU repacking) have an upper bound; the installed versions satisfy every bound; the private names
    exist in them."""
    import dataclasses
    import importlib
    import importlib.metadata

    reqs = _requirements()
    for name, apis in PRIVATE_APIS.items():
        spec = reqs[name].specifier
        assert any(s.operator in ("<", "<=", "~=", "==") for s in spec), f"{name} has no upper bound: {spec}"
        for api in apis:
            module, attr = api.split(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
                assert hasattr(obj, part) or part in fields, f"{api} is gone in {name} " \
                    f"{importlib.metadata.version(name)}"
                obj = getattr(obj, part, None)
    for name, req in reqs.items():
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = importlib.metadata.version(name)
        assert req.specifier.contains(version, prereleases=True), f"installed {name} {version} outside {req}"


def test_base_install_draws_the_curves_and_carries_a_license():
    """The README promises training_curves.png from every run: matplotlib is a base dependency, not dev."""
    assert "matplotlib" in _requirements()
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert project["scripts"]["distsft"] == "distsft.cli:console_main"
