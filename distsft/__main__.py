"""`python -m distsft <command>`: the `distsft` command without the console script (see distsft/cli.py)."""

import sys
from pathlib import Path

# Run from the repository root, `python -m` put the root first on sys.path, where the top-level `kernels/`
# folder would shadow the PyPI `kernels` package that transformers probes for (DESIGN.md). distsft itself
# is imported by now; the root can leave the path before anything else is imported.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

from distsft.cli import console_main  # noqa: E402

console_main()
