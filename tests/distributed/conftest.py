"""The scripts here are torchrun workers (tests/test_distributed.py launches them), not test modules.

``primitives.py`` joins a process group when imported, so none of them is collected (doctests included).
"""

collect_ignore_glob = ["*.py"]
