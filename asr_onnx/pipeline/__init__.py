"""The pipeline: the Repair driver (stage order and one run's state), cross-fitting, the guard, the sweep,
and the bundled demo."""
