"""Pruning: masks and allocation, scores (magnitude, Wanda, rownorm), N:M conformance, and channels/."""
