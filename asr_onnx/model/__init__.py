"""The model: files (load, save, external data), graph (layers and sites), the graph builder, batch policy,
output kinds, sessions with the one batch loop, and the output check."""
