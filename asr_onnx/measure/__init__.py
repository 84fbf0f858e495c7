"""Measurement: reference norms and floors, the statistics graph, the passes that return a Measurement,
mergeable float64 statistics, and the dense-statistics cache."""
