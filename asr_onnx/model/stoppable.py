"""onnxruntime runs that a signal stops between two nodes.

Python runs a signal handler (SIGINT, and SIGTERM, which the CLI turns into KeyboardInterrupt) only between
bytecodes of the main thread, so one ``session.run`` of a few seconds would hold it back until the run ends.
Here the run goes on in a worker thread while the main thread waits in short steps; when the handler raises,
onnxruntime is told to terminate, which it does before its next node, and the exception goes on once the
worker has ended. The worker is always waited for: a process that exits while onnxruntime still computes
is aborted by its thread pool. A node's own work is what bounds the wait (the refit bounds it, see
:data:`asr_onnx.refit.reconstruct.MAX_NODE_MACS`).
"""

from __future__ import annotations

import threading

STEP_S = 0.05  # how often the waiting main thread lets a handler run


def run(session, names: list[str], feed: dict):
    """``session.run(names, feed)``, which a KeyboardInterrupt (or any exception raised while it waits) stops.

    Raises:
        whatever the run raised; KeyboardInterrupt when a signal stopped it.
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    outcome: dict = {}
    done = threading.Event()  # not Thread.join: a join that a signal interrupts can take a live thread for ended

    def work():
        try:
            outcome["values"] = session.run(names, feed, options)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="asr-onnx run", daemon=True).start()
    try:
        while not done.wait(STEP_S):
            pass
    except BaseException:
        options.terminate = True
        _wait_out(done)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["values"]


def _wait_out(done: threading.Event) -> None:
    """Waits until the terminated run has ended, through any further signal."""
    while True:
        try:
            if done.wait(STEP_S):
                return
        except BaseException:  # noqa: BLE001, S112 - a second Ctrl-C: the first one is already on its way
            continue
