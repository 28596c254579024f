"""fastgrpo microbenchmarks: one script per op, peers side by side, CSV + PNG under ``bench/results/``.

Run ``python -m bench.run --help`` (or ``fastgrpo bench``); ``bench/README.md`` explains the conventions.
Nothing here is imported by the library.
"""
