"""Side-by-side measurements of tegaki, and their log (RESULTS.md, one current table per benchmark).

Each benchmark is a module of this package, run from the repository root:

    python -m benchmarks.bench_generate --quick

common.py holds what they share (the machine, interleaved rounds, the report and RESULTS.md);
engines.py and contestants.py the decoding race of bench_generate, bench_matvec and bench_gpu.
"""
