"""Engines: where a pass over the calibration set runs. ``local`` is this process; ``ray`` shards the set over
the actors of a Ray cluster.

A pass is a function ``shard -> result`` (a shard is a calib.CalibSet over a contiguous run of the set's
batches). :meth:`RayEngine.map` cuts the set at batch boundaries (:func:`shard_bounds`), so that every
shard's batches are exactly the single-process batches; each actor runs the pass on its shards with its own
onnxruntime sessions and returns only the sums; the results come back in shard order, never in completion
order, and the caller merges them in float64 in that order. A worker that dies is restarted by Ray and its
shard rerun; the caller gets nothing until every shard is back.

Ray is an optional extra (``pip install "asr-onnx[ray]"``), imported only when a RayEngine is made.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from asr_onnx.errors import AsrError, first_line

ENGINES = ("local", "ray")
EXTRA = 'asr-onnx[ray]'
RESTARTS = 3  # a worker that dies is restarted, and its shard rerun, this many times


def shard_bounds(samples: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) sample ranges that cut ``samples`` at multiples of ``batch_size``.

    The last partial batch stays with the last shard, so that a model with a fixed batch skips exactly the batch
    it skips in one process. There are never more shards than full batches (and at least one).

    Args:
        samples: the set's size.
        batch_size: samples per run.
        shards: how many shards are wanted.
    """
    full = samples // batch_size
    count = max(1, min(shards, full))
    cuts = [batch_size * (full * i // count) for i in range(count)] + [samples]
    return [(cuts[i], cuts[i + 1]) for i in range(count)]


@dataclass
class PassRecord:
    """One pass an engine ran: its label, its samples, its shards and its wall time."""

    name: str
    samples: int
    shards: int
    seconds: float

    def entry(self) -> dict:
        return {"pass": self.name, "samples": self.samples, "shards": self.shards, "seconds": round(self.seconds, 4)}


@dataclass
class LocalEngine:
    """Every pass in this process, in one piece (today's behaviour)."""

    name: str = "local"
    distributed: bool = False
    passes: list[PassRecord] = field(default_factory=list)

    def map(self, run: Callable[[Any], Any], calib, batch_size: int, desc: str = "pass") -> list:
        """``[run(calib)]``: one shard, the whole set."""
        start = time.perf_counter()
        result = [run(calib)]
        self.passes.append(PassRecord(desc, len(calib), 1, time.perf_counter() - start))
        return result

    def workers(self, samples: int = 0, provider: str = "CPUExecutionProvider") -> list[dict]:
        """This process as the one worker: its host, the device of ``provider``, and ``samples``."""
        return [{"host": socket.gethostname(), "device": device_of(provider), "samples": samples}]

    def close(self) -> None:
        pass


def device_of(provider: str) -> str:
    return "cuda" if provider == "CUDAExecutionProvider" else "cpu"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise AsrError(f'--engine ray needs Ray: pip install "{EXTRA}"') from None
    return ray


class _Worker:
    """A Ray actor's body: runs a pass on a shard in its own process, where the pass makes its sessions."""

    def run(self, run: Callable, shard, device: str):
        """(result, this worker's host and device), or ("error", the AsrError's line): an AsrError travels
        as its one line, not as a remote traceback."""
        from asr_onnx.model.session import providers

        try:
            result = run(shard)
        except AsrError as e:
            return "error", str(e)
        return "ok", result, {"host": socket.gethostname(), "pid": os.getpid(), "device": device_of(providers(device)[0])}

    def pid(self) -> int:
        return os.getpid()


class RayEngine:
    """Passes sharded over the actors of a Ray cluster.

    Args:
        address: the cluster to join; None uses RAY_ADDRESS, and without it starts a local cluster. Defaults
            to None.
        workers: how many actors (one CPU each); None: one per CPU of the cluster. Defaults to None.
        num_cpus: the CPUs of a local cluster started here; None lets Ray count them. Defaults to None.
        device: the device each actor runs its sessions on ("auto", "cpu" or "cuda"). Defaults to "auto".
        shards_per_worker: shards per actor and pass; more shards spread the work more evenly and make a
            rerun cheaper. Defaults to 1.

    Raises:
        AsrError: Ray is not installed (naming the extra), or the cluster cannot be reached.
    """

    name = "ray"
    distributed = True

    def __init__(self, address: str | None = None, *, workers: int | None = None, num_cpus: int | None = None,
                 device: str = "auto", shards_per_worker: int = 1):
        ray = _import_ray()
        self._ray, self.device, self.shards_per_worker = ray, device, shards_per_worker
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.started = not ray.is_initialized()
        if self.started:
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                else:  # Ray's start-up lines would precede our summary, or our one error line
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
            except Exception as e:  # noqa: BLE001 - Ray's connection errors are many; one line for each
                raise AsrError(f"cannot start or join the Ray cluster {self.address or '(local)'}: "
                               f"{type(e).__name__}: {first_line(e)}") from None
        count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Worker)
        self.actors = [actor.remote() for _ in range(count)]
        self.passes: list[PassRecord] = []
        self._last: list[dict] = []

    def map(self, run: Callable[[Any], Any], calib, batch_size: int, desc: str = "pass") -> list:
        """``run`` on every shard of ``calib`` (cut at multiples of ``batch_size``), on the actors in turn.

        Returns:
            the shards' results, in shard order.

        Raises:
            AsrError: a shard's pass raised one (its line), or a worker kept dying.
        """
        ray = self._ray
        start = time.perf_counter()
        bounds = shard_bounds(len(calib), batch_size, len(self.actors) * self.shards_per_worker)
        shared = ray.put(run)  # one copy in the object store, however many shards read it
        pending = [self.actors[i % len(self.actors)].run.remote(shared, calib.slice(a, b), self.device)
                   for i, (a, b) in enumerate(bounds)]
        try:
            replies = ray.get(pending)  # in shard order, whatever order they finished in
        except ray.exceptions.RayError as e:
            raise AsrError(f"the Ray pass {desc!r} failed: {type(e).__name__}: {first_line(e)}") from None
        for reply in replies:
            if reply[0] == "error":
                raise AsrError(reply[1])
        self._last = [dict(reply[2], samples=b - a) for reply, (a, b) in zip(replies, bounds)]
        self.passes.append(PassRecord(desc, len(calib), len(bounds), time.perf_counter() - start))
        return [reply[1] for reply in replies]

    def workers(self, samples: int = 0, provider: str = "") -> list[dict]:
        """One entry per worker of the last pass (``samples`` and ``provider`` are the local engine's): host, device and the samples of its shards."""
        merged: dict = {}
        for entry in self._last:
            key = (entry["host"], entry["pid"])
            if key in merged:
                merged[key]["samples"] += entry["samples"]
            else:
                merged[key] = {"host": entry["host"], "device": entry["device"], "samples": entry["samples"]}
        return list(merged.values())

    def pids(self) -> list[int]:
        """The actors' process ids (for a test that kills one)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        """Ends the actors, and the local cluster if this engine started it."""
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self.started:
            self._ray.shutdown()


def make_engine(name: str = "local", *, address: str | None = None, device: str = "auto",
                workers: int | None = None, num_cpus: int | None = None):
    """The engine called ``name`` ("local" or "ray").

    Raises:
        AsrError: an unknown name; for "ray", see :class:`RayEngine`.
    """
    if name == "local":
        if address:
            raise AsrError("--ray-address needs --engine ray")
        return LocalEngine()
    if name == "ray":
        return RayEngine(address, workers=workers, num_cpus=num_cpus, device=device)
    raise AsrError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
