"""Producing a stream's items on a worker thread ahead of its consumer.

The harvest tokenises the next batches of text while the model runs, and training reads (and checks) the next
batches of activations while the SAEs step: both are this one generator over a different item stream.
"""

from __future__ import annotations

import queue
import threading
from typing import Generator, Iterator, TypeVar

T = TypeVar("T")


def ahead(items: Iterator[T], depth: int, name: str = "sae-ahead") -> Generator[T, None, None]:
    """`items`, produced on a worker thread (named `name`) up to `depth` items ahead of the consumer: the work of
    making them (reading, tokenising: a fast tokenizer and torch's kernels release the GIL) runs while the consumer
    computes. An error in the worker is raised in the consumer where the items stop. Closing the generator stops the
    worker and waits for it, so whatever the items use (a tokenizer, a reader) is never used by two threads at once
    (fast tokenizers refuse that: "Already borrowed"); a worker that has not been started (no item taken) is none."""
    channel: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: object, err: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                channel.put((item, err), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            put(end, err)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            item, err = channel.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
