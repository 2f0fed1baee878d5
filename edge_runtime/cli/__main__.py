"""``python -m edge_runtime.cli``: the ``edge-rt`` command."""

from edge_runtime.cli import main

main()
