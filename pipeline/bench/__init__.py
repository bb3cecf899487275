"""Performance measurements of lamina, each a plain module runnable on its own.

    suite.py       `lamina bench`: pipeline efficiency, speed-up, per-hop transport, memory, scaling
    measure.py     its measuring processes: a stage alone, the in-process engines, a pipeline run's CPU
    report.py      its output: bench.json, bench.md, bench.png
    transport.py   per-hop cost of activation transports against memcpy (used by the suite)
    gpu_check.py   the same questions on one CUDA device (`python -m pipeline.bench.gpu_check`)
    PERFLOG.md     what was measured, what was predicted, what changed
"""
