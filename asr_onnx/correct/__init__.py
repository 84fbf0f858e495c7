"""Correction: the methods' gains, BN recalibration, and writing corrections into the graph."""
