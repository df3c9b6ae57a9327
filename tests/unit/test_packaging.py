"""The `kernels/` folder must never be importable as `kernels` (DESIGN.md naming hazard): that name is
the PyPI package transformers and bitsandbytes probe for. It installs as `distsft_kernels`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

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
print("PROBE", import_utils._is_package_available("kernels", return_version=True))
import distsft_kernels
print("DISTSFT_KERNELS", distsft_kernels.__file__)
"""


def _probe() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO))], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_import_kernels_does_not_resolve_to_our_folder():
    """Also the regression for the GPU machine's crash: transformers 5.17 imports `kernels` unguarded when
    it finds one on sys.path without metadata, so the folder must not raise when imported by that name."""
    lines = _probe()
    ours = (REPO / "kernels").resolve()
    if "FILE" in lines:  # another `kernels` (the PyPI one, if installed) or an empty placeholder; never ours
        path = lines["FILE"]
        assert path == "None" or not Path(path).resolve().is_relative_to(ours), f"`import kernels` gave {path}"
    else:
        assert "IMPORTERROR" in lines
    if "FILE" in lines and lines["FILE"] == "None":  # the placeholder reads as "not installed"
        assert lines["PROBE"].startswith("(False")
    # editable install: our folder; regular install: site-packages/distsft_kernels
    assert Path(lines["DISTSFT_KERNELS"]).resolve().parent.name in ("kernels", "distsft_kernels")


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
