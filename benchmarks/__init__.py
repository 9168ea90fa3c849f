"""free-dfml benchmark harness: ``python -m benchmarks.run --preset tiny|quick|full``.

One module per benchmark (``accuracy``, ``recovery``, ``batched``, ``hetero``, ``scaling``), shared
set-up in :mod:`benchmarks.common`, presets in :mod:`benchmarks.presets`, report writing (JSON,
Markdown, PNG plots) in :mod:`benchmarks.report`. See ``docs/benchmarks.md``.
"""
