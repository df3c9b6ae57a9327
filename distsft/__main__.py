"""`python -m distsft <command>` (or `python path/to/distsft/__main__.py <command>` from a checkout that is
not installed, as launch/multinode.sh and launch/slurm.sbatch do): the `distsft` command (distsft/cli.py)."""

import sys
from pathlib import Path

_PKG = Path(__file__).resolve().parent
# Run as a file, Python put distsft/ itself first on sys.path, where a sibling module would shadow a library
# of its name (DESIGN.md): drop it, and fall back to the checkout (appended last) where distsft is not installed.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PKG]
if not __package__:
    import importlib.util

    if importlib.util.find_spec("distsft") is None:
        sys.path.append(str(_PKG.parent))

from distsft.cli import console_main  # noqa: E402

console_main()
