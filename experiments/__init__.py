"""One-off studies of free-dfml, kept apart from the product and from the benchmark harness.

Each study is ``python -m experiments.<name> --help``; what each asked and found, and where its
result files are, is in ``experiments/README.md``.
"""
