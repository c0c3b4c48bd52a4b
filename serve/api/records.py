"""The API's view of responses: the public proto, its engine rounds and its pending calls.

One public response may take several engine rounds (each built-in tool result continues the
generation as a new engine request), so the record maps the public ``resp_...`` id to the engine
ids of its rounds; a later ``previous_response_id`` continues from the last one. The store is a
bounded LRU, safe to use from the event loop and from worker threads.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

from protos.kestrel.v1 import kestrel_pb2 as pb


@dataclasses.dataclass(eq=False)
class ResponseRecord:
    """A response as the API keeps it.

    Attributes:
      response: the Response proto, updated as the response runs.
      engine_ids: engine request ids of its rounds, oldest first.
      pending_calls: call_id -> function name of client calls the response ended with.
      carried_tool_messages: results of built-in calls made in the same turn as client calls; the
        continuation sends them to the model together with the client's outputs.
      running_id: the engine id generating now (None between rounds and after the end).
      done: the response reached a terminal status.
      cancelled: Cancel was asked for.
    """

    response: pb.Response
    engine_ids: list[str] = dataclasses.field(default_factory=list)
    pending_calls: dict[str, str] = dataclasses.field(default_factory=dict)
    carried_tool_messages: list[dict] = dataclasses.field(default_factory=list)
    running_id: str | None = None
    done: bool = False
    cancelled: bool = False
    stored: bool = True


class RecordStore:
    """response id -> ResponseRecord, least recently used evicted past ``max_records``."""

    def __init__(self, max_records: int = 1024):
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.max_records = max_records
        self._items: collections.OrderedDict[str, ResponseRecord] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, record: ResponseRecord) -> list[ResponseRecord]:
        """Adds a record; returns the evicted ones (whose engine state the caller drops)."""
        evicted = []
        with self._lock:
            self._items[record.response.id] = record
            self._items.move_to_end(record.response.id)
            while len(self._items) > self.max_records:
                oldest = next(iter(self._items))
                if not self._items[oldest].done:
                    break  # running responses are never evicted
                evicted.append(self._items.pop(oldest))
        return evicted

    def get(self, response_id: str) -> ResponseRecord | None:
        with self._lock:
            rec = self._items.get(response_id)
            if rec is not None:
                self._items.move_to_end(response_id)
            return rec

    def pop(self, response_id: str) -> ResponseRecord | None:
        with self._lock:
            return self._items.pop(response_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
