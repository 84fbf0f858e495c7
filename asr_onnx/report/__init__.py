"""The report: its record, JSON, HTML page, plots, terminal summary, and `inspect`."""
