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
