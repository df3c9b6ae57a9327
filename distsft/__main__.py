"""`python -m distsft <command>` (or `python path/to/distsft/__main__.py <command>` from a checkout that is
not installed, as launch/multinode.sh and launch/slurm.sbatch do): the `distsft` command (distsft/cli.py)."""

import sys
from pathlib import Path

_PKG = Path(__file__).resolve().parent
# `python -m distsft` from the repository root put the root first on sys.path, where the top-level `kernels/`
# folder would shadow the PyPI `kernels` package that transformers probes for; run as a file, Python put
# distsft/ itself there, where a sibling module would shadow a library of its name (DESIGN.md). Neither
# entry is needed once distsft is found: drop both, and fall back to the checkout (appended last).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (_PKG, _PKG.parent)]
if not __package__:
    import importlib.util

    if importlib.util.find_spec("distsft") is None:
        sys.path.append(str(_PKG.parent))

from distsft.cli import console_main  # noqa: E402

console_main()
