"""A network run one depth segment at a time: each segment starts from the activations where the previous
one stopped (its frontier), kept per calibration batch, so that no pass recomputes the network before it.

A tensor's depth is the largest number of prunable layers on a path from the graph inputs to it; the
segment (lo, hi] holds the nodes whose outputs have a depth in (lo, hi], and the frontier at depth d is
every tensor of depth at most d that a deeper node reads. Constants (tensors that no graph input reaches)
have no depth: a segment computes the ones it needs itself.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from asr_onnx.tempdirs import temporary_folder


def tensor_depths(graph, layer_nodes: set[int]) -> dict[str, int]:
    """Tensor name -> depth, for every tensor computed from a graph input.

    Args:
        graph: a toposorted gs graph.
        layer_nodes: ``id`` of every prunable layer's node (each adds 1 to the depth of its outputs).
    """
    depth = {t.name: 0 for t in graph.inputs}
    for node in graph.nodes:
        reached = [depth[t.name] for t in node.inputs if t.name in depth]
        if not reached:
            continue
        level = max(reached) + (1 if id(node) in layer_nodes else 0)
        for t in node.outputs:
            depth[t.name] = level
    return depth


def frontier(graph, depth: dict[str, int], at: int) -> list[str]:
    """The tensors of depth at most ``at`` that a node deeper than ``at`` reads, in graph order."""
    names: list[str] = []
    for node in graph.nodes:
        out = [depth[t.name] for t in node.outputs if t.name in depth]
        if not out or max(out) <= at:
            continue
        for t in node.inputs:
            if t.name in depth and depth[t.name] <= at and t.name not in names:
                names.append(t.name)
    return names


class BatchStore:
    """Per calibration batch, named arrays: in memory up to ``memory_mb``, beyond it one file per array in a
    temporary folder (removed by :meth:`close`, or after a SIGKILL by a later run: see
    :mod:`asr_onnx.tempdirs`), read back whole, so that nothing stays mapped. An array
    kept from one pass to the next is written once.

    Args:
        memory_mb: how many MB of arrays stay in memory; the rest goes to disk. Defaults to 0 (all on disk,
            where the page cache keeps a small frontier in memory without counting it against the process).
    """

    def __init__(self, memory_mb: float = 0.0):
        self.budget, self.used = memory_mb * 2**20, 0
        self.batches: list[dict[str, np.ndarray | str]] = []  # per batch, name -> array or file path
        self._folder: tempfile.TemporaryDirectory | None = None
        self._files = 0

    def __len__(self) -> int:
        return len(self.batches)

    def put(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Stores batch ``index`` (the next one, or one already stored, which it replaces); an array that
        this batch already holds under the same name is taken to be the same and is kept as it is."""
        old = self.batches[index] if index < len(self.batches) else {}
        new: dict[str, np.ndarray | str] = {}
        for name, array in arrays.items():
            if name in old:
                new[name] = old.pop(name)
            elif self.used + array.nbytes <= self.budget:
                new[name], self.used = array, self.used + array.nbytes
            else:
                new[name] = self._write(array)
        for held in old.values():
            self._forget(held)
        if index < len(self.batches):
            self.batches[index] = new
        else:
            self.batches.append(new)

    def get(self, index: int) -> dict[str, np.ndarray]:
        """Batch ``index`` as it was stored."""
        return {name: held if isinstance(held, np.ndarray) else np.load(held, allow_pickle=False)
                for name, held in self.batches[index].items()}

    def close(self) -> None:
        """Forgets every batch and removes the temporary folder."""
        self.batches, self.used = [], 0
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def _write(self, array: np.ndarray) -> str:
        if self._folder is None:
            self._folder = temporary_folder("frontier")
        self._files += 1
        path = os.path.join(self._folder.name, f"{self._files}.npy")
        np.save(path, array, allow_pickle=False)
        return path

    def _forget(self, held) -> None:
        if isinstance(held, np.ndarray):
            self.used -= held.nbytes
        else:
            os.remove(held)
