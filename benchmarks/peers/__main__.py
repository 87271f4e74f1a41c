"""``python -m benchmarks.peers``: see :mod:`benchmarks.peers.runner`."""

from benchmarks.peers.runner import main

main()
