"""The strategy suite behind docs/results.md, split by concern. The runner is
``benchmarks/experiments.py``; here:

    spec.py     what the suite is: strategies, epochs per label fraction, target, published anchors
    records.py  run directories, numbers read back from event files, docs/results_runs.jsonl
    report.py   statistics, tables and findings -> docs/results.md and the README block
    plot.py     the accuracy-vs-wall-time figure

Arrows point down: runner -> report -> plot/records -> spec.
"""
