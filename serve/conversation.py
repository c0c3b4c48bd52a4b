"""Stored responses: finished turns kept by id so a later request can continue the conversation.

A request that names ``previous_response_id`` continues *at the token level*: its prompt is the
stored turn's prompt and output tokens (reasoning included, exactly as generated), then the new
messages rendered as a continuation. Its first pages hash exactly like the earlier turn's, so while
they stay in the prefix cache only the new tokens are computed (usage reports the rest as cached).

The store is bounded: past ``max_responses`` the least recently used response is evicted
(a lookup counts as a use). Thread-safe: the engine loop stores, API threads read and delete.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from serve.events import Usage


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    """One finished turn.

    Attributes:
      response_id: the id a later request names as ``previous_response_id``.
      messages: the conversation so far as OpenAI-style dicts, this turn's assistant message last
        (``content``, ``reasoning_content``, ``tool_calls``); ``None`` for raw token requests.
      prompt_token_ids: the turn's prompt.
      output_token_ids: what the model generated (stop token included).
      finish_reason: why the turn ended.
      usage: the turn's token counts.
      tools: the tool schemas offered in the turn (a continuation renders with them again).
      mm_spans, mm_inputs: the images of the prompt (spans and preprocessed pixels), which a
        continuation's prompt keeps at the same offsets.
    """

    response_id: str
    messages: tuple[dict[str, Any], ...] | None
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    tools: tuple[dict[str, Any], ...] = ()
    mm_spans: tuple = ()
    mm_inputs: tuple = ()

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt followed by output: the prefix a continuation starts with."""
        return self.prompt_token_ids + self.output_token_ids


class ResponseStore:
    """A bounded LRU map of response id -> :class:`StoredResponse`.

    Args:
      max_responses: most responses kept (>= 1); the least recently used is evicted first.
    """

    def __init__(self, max_responses: int = 1024):
        if isinstance(max_responses, bool) or not isinstance(max_responses, int) or max_responses < 1:
            raise ValueError(f"max_responses must be an int >= 1, got {max_responses!r}")
        self.max_responses = max_responses
        self._items: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.num_evictions = 0

    def put(self, response: StoredResponse) -> None:
        with self._lock:
            self._items[response.response_id] = response
            self._items.move_to_end(response.response_id)
            while len(self._items) > self.max_responses:
                self._items.popitem(last=False)
                self.num_evictions += 1

    def get(self, response_id: str) -> StoredResponse | None:
        """The response, or ``None`` when unknown or evicted."""
        with self._lock:
            item = self._items.get(response_id)
            if item is not None:
                self._items.move_to_end(response_id)
            return item

    def delete(self, response_id: str) -> bool:
        """Forgets a response; returns whether it was there."""
        with self._lock:
            return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, response_id: str) -> bool:
        with self._lock:
            return response_id in self._items
