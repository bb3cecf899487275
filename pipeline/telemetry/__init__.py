"""What a person watching a run sees: Ray gauges (gauges.py), the metrics log (metrics_log.py), the collapse
alarm (collapse.py) and the progress bar (progress.py)."""
