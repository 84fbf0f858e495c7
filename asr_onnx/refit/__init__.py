"""The least-squares refit: Gram graphs, the level-by-level solve, and the frontier store."""
