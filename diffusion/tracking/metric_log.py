"""Per-step metrics that outlive an outage of the tracking store.

Once training runs, its metrics go through a :class:`MetricLog`: a file first, then the
store from a background thread, so an outage neither holds training up nor loses a
point; what the store never got stays in the file for the next training to send. The
thread talks to the store through a client of the URI the log was opened with; it
touches no global MLflow state.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion.files import atomic_write_text
from diffusion.tracking.store import fail_fast, mlflow_client, reason

UNSENT_FILE = "unsent-metrics-{run_id}.jsonl"
"""A :class:`MetricLog`'s file: the points of the run that the store does not have yet."""
SEND_RETRY_S = 5.0  # between tries while the store does not answer
CLOSE_WAIT_S = 30.0  # the most that closing a MetricLog waits for its last send
MAX_BATCH = 1000  # MLflow's limit on the metrics of one log_batch


class MetricLog:
    """The per-step metrics of a running stage, ``log(step, metrics)``, sent to run ``run_id``
    by a background thread: a store that is slow or down never holds the caller up.

    Each point is appended to ``<folder>/unsent-metrics-<run_id>.jsonl`` (a JSON line) before
    it is queued, and leaves that file once the store has it: a ``kill -9`` loses no point,
    and after an outage the file holds what the store missed. Sends are batched, under
    :data:`~diffusion.tracking.store.FAST_FAIL` limits, retried every :data:`SEND_RETRY_S` s
    while the store is down. Opening the log of a run sends first what its file still holds (a killed or offline
    training's points), and a point is dropped if the run already has that key at that
    step or later: a training resumed from a checkpoint repeats the steps after it, and
    each (key, step) is logged once. Use it as a context manager; :attr:`unsent` is then
    how many points the store did not get (still in :attr:`path`). ``tracking_uri`` is
    the store (default :func:`~diffusion.tracking.store.tracking_uri`).
    """

    def __init__(self, run_id: str, folder: str | Path, tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.path = Path(folder) / UNSENT_FILE.format(run_id=run_id)
        self.unsent = 0
        self.error: str | None = None  # why the last send failed
        self._pending: list[dict[str, Any]] = []
        self._newest: dict[str, int] = {}  # key -> newest step logged (sent or pending)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._limits = fail_fast()

    def __enter__(self) -> MetricLog:
        self._client = mlflow_client(self.tracking_uri)
        with fail_fast(), contextlib.suppress(Exception):  # down now: all the file holds is pending
            run = self._client.get_run(self.run_id)
            for key in run.data.metrics:
                if not key.startswith("system/"):
                    self._newest[key] = max(m.step for m in self._client.get_metric_history(self.run_id, key))
        for point in self._read():
            if point["step"] > self._newest.get(point["key"], -1):
                self._pending.append(point)
        for point in self._pending:
            self._newest[point["key"]] = max(point["step"], self._newest.get(point["key"], -1))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._rewrite()
        self._limits.__enter__()  # for the sender and MLflow's system-metrics thread, until close()
        self._thread = threading.Thread(target=self._send_loop, name="diffusion-metrics", daemon=True)
        self._thread.start()
        self._wake.set()
        return self

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        points = [
            {"key": key, "value": float(value), "timestamp": now, "step": int(step)}
            for key, value in metrics.items()
            if step > self._newest.get(key, -1)
        ]
        if not points:
            return
        for point in points:
            self._newest[point["key"]] = point["step"]
        with self._lock:
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(point) + "\n" for point in points))
            self._pending.extend(points)
        self._wake.set()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> int:
        """Send what is left (waiting at most :data:`CLOSE_WAIT_S` s) and stop; returns :attr:`unsent`."""
        if self._thread is not None:
            self._closing.set()
            self._wake.set()
            self._thread.join(CLOSE_WAIT_S)
            self._thread = None
            self._limits.__exit__(None, None, None)
        with self._lock:
            self.unsent = len(self._pending)
        return self.unsent

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        points = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line torn by a kill mid-append
                point = json.loads(line)
                if isinstance(point, dict) and {"key", "value", "timestamp", "step"} <= point.keys():
                    points.append(point)
        return points

    def _rewrite(self) -> None:
        """The file := the pending points (called holding the lock); no file when none is pending."""
        if not self._pending:
            self.path.unlink(missing_ok=True)
            return
        atomic_write_text(self.path, "".join(json.dumps(point) + "\n" for point in self._pending))

    def _send(self) -> bool:
        """Send the pending points in batches; False when the store refused or did not answer."""
        from mlflow.entities import Metric

        while True:
            with self._lock:
                batch = self._pending[:MAX_BATCH]
            if not batch:
                return True
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(**point) for point in batch])
            except Exception as err:  # down, or refusing: the points wait in the file
                self.error = reason(err)
                return False
            with self._lock:
                del self._pending[: len(batch)]
                self._rewrite()

    def _send_loop(self) -> None:
        while not self._closing.is_set():
            if self._send():
                self._wake.wait()
                self._wake.clear()
            else:
                self._closing.wait(SEND_RETRY_S)
        self._send()  # the last try, at close
