"""hfpipe benchmarks: measured ratios against the physics (pipeline bubbles) and against native/bare baselines.

``python benchmarks/run_all.py`` (``make bench``) runs what the machine can run and writes ``benchmarks/RESULTS.md``.
"""
