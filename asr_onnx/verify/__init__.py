"""Verification: evaluation per output kind, comparison with tolerances, timing, and float16 deployment."""
