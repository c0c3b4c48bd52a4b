"""A draft model for speculative decoding: a smaller checkpoint with the target's tokenizer.

The draft keeps its own K/V pages, a second page pool laid out like the target's and indexed by
the very same page tables: logical page j of a request lives in physical page ``table[j]`` of both
pools, so the scheduler's allocation, preemption and cancellation cover the draft with no
bookkeeping of its own. The draft runs through a second ``ModelRunner`` (same jitted step, its
own weights and pages).

Per speculative step and request (fed token at position N - 1, k slots reserved):

1. catch-up: the tokens the draft has not yet seen, ``[valid, N)``, in one packed prefill
   (normally the previous step's correction token, or two tokens after a fully accepted draft;
   the whole prompt for a new or preempted request), sampling d_1;
2. k - 1 decode steps feeding d_1 .. d_{k-1} at positions N .. N + k - 2.

``valid`` is recomputed from what was committed: the draft's K/V is right up to the drafts the
target accepted. Draft slots past the committed tokens are garbage the next catch-up overwrites.
A draft whose K/V is stale (a prefix-cache page another request's target filled) only lowers
acceptance; verification keeps the output exact either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import jax.numpy as jnp

from model.tokenizer import Tokenizer
from serve.kv_pages import KVCacheManager
from serve.buckets import length_bucket
from serve.runner import Draft, ModelRunner
from serve.scheduler import ScheduledRequest


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of every token's bytes, in id order (equal iff the vocabularies spell alike)."""
    h = hashlib.sha256()
    for piece in tokenizer.token_bytes():
        h.update(len(piece).to_bytes(4, "little") + piece)
    return h.hexdigest()


def check_same_tokenizer(target_cfg, target_tok: Tokenizer | None, draft_cfg,
                         draft_tok: Tokenizer | None) -> None:
    """Refuses a draft whose token ids mean something else than the target's.

    Raises:
      ValueError: naming the first difference (vocabulary size, special token ids, stop ids,
        or the token pieces themselves).
    """
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft_cfg.vocab_size} entries, the "
                         f"target's {target_cfg.vocab_size}: a draft model needs the target's tokenizer")
    if (target_tok is None) != (draft_tok is None):
        raise ValueError("give the draft model's tokenizer too, to check it against the target's")
    if target_tok is None:
        return
    if draft_tok.vocab_size != target_tok.vocab_size:
        raise ValueError(f"the draft tokenizer has {draft_tok.vocab_size} tokens, the target's "
                         f"{target_tok.vocab_size}: a draft model needs the target's tokenizer")
    if dict(draft_tok.special_ids) != dict(target_tok.special_ids):
        diff = sorted(set(draft_tok.special_ids.items()) ^ set(target_tok.special_ids.items()))
        raise ValueError(f"the draft tokenizer's special tokens differ from the target's: {diff[:4]}")
    if set(draft_tok.stop_ids) != set(target_tok.stop_ids):
        raise ValueError(f"the draft tokenizer's stop ids {sorted(draft_tok.stop_ids)} differ from "
                         f"the target's {sorted(target_tok.stop_ids)}")
    if tokenizer_fingerprint(draft_tok) != tokenizer_fingerprint(target_tok):
        first = next(i for i, (a, b) in enumerate(zip(draft_tok.token_bytes(), target_tok.token_bytes()))
                     if a != b)
        raise ValueError(f"the draft tokenizer spells token {first} differently from the target's "
                         f"({draft_tok.token_bytes()[first]!r} vs {target_tok.token_bytes()[first]!r}): "
                         "a draft model needs the target's tokenizer")


def draft_layer_groups(kv: KVCacheManager, draft_cfg) -> tuple[int, ...]:
    """The target page group each draft layer reads its page table from.

    Every draft layer uses a group whose pages cover its span: the target's global group when it
    has one (it keeps every page), else its sliding group if the draft's windows fit in it.
    """
    globals_ = [i for i, g in enumerate(kv.groups) if g.window is None]
    if globals_:
        return (globals_[0],) * draft_cfg.num_layers
    window = kv.groups[0].window
    if any(t != "sliding" for t in draft_cfg.layer_types) or draft_cfg.sliding_window > window:
        raise ValueError(f"the target keeps only a sliding window of {window} tokens; a draft model "
                         f"needs layers that see no further (sliding_window <= {window})")
    return (0,) * draft_cfg.num_layers


class DraftModelProposer:
    """Proposes k tokens per request with a draft model; see the module docstring."""

    def __init__(self, config, *, target, target_tokenizer, kv: KVCacheManager, attn_impl: str):
        draft = config.draft_model
        check_same_tokenizer(target.config, target_tokenizer, draft.config, config.draft_tokenizer)
        self.k = config.num_speculative_tokens
        self.runner = ModelRunner(draft, kv, attn_impl=attn_impl,
                                  layer_groups=draft_layer_groups(kv, draft.config))
        # Per request: (preemptions seen, position of d_1, the drafts fed to the draft model).
        self._fed: dict[str, tuple[int, int, tuple[int, ...]]] = {}

    def lookahead(self, request, k: int) -> int:
        return k

    def release(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._fed.pop(rid, None)

    def _valid(self, request) -> int:
        """Leading positions whose draft K/V matches the committed tokens."""
        seen = self._fed.get(request.request_id)
        if seen is None or seen[0] != request.num_preemptions:
            return 0
        _, pos, fed = seen
        committed = request.token_slice(pos, min(pos + len(fed), request.num_tokens))
        same = next((i for i, (a, b) in enumerate(zip(committed, fed)) if a != b), len(committed))
        return min(pos + same, request.num_tokens - 1)  # re-feed at least the last token

    def propose(self, entries: Sequence[ScheduledRequest], masks: Mapping) -> dict[str, Draft]:
        with_probs = any(e.request.params.temperature > 0 for e in entries)
        ks = {e.request_id: min(self.k, e.num_lookahead) for e in entries}
        drafts: dict[str, list[int]] = {e.request_id: [] for e in entries}
        probs: dict[str, list] = {e.request_id: [] for e in entries}

        def collect(rows: list[ScheduledRequest], out) -> None:
            for i, e in enumerate(rows):
                drafts[e.request_id].append(out[e.request_id].token_id)
                if with_probs:
                    probs[e.request_id].append(self.runner.last_probs[i])

        catch_up = []
        for e in entries:
            r, n = e.request, e.request.num_tokens
            start = self._valid(r)
            catch_up.append(dataclasses.replace(
                e, token_ids=tuple(r.token_slice(start, n)), start_position=start, num_lookahead=0))
        t = max(len(e.token_ids) for e in catch_up)
        collect(catch_up, self.runner._run(catch_up, 1 if t == 1 else length_bucket(t), masks,
                                           probs=with_probs))
        for j in range(1, self.k):
            rows = [dataclasses.replace(e, token_ids=(drafts[e.request_id][-1],),
                                        start_position=e.start_position + j, num_lookahead=0,
                                        sample_offset=j,
                                        prev_token_id=drafts[e.request_id][-2] if j > 1 else None)
                    for e in entries if ks[e.request_id] > j]
            if not rows:
                break
            collect(rows, self.runner._run(rows, 1, masks, probs=with_probs))
        out = {}
        for e in entries:
            rid, k = e.request_id, ks[e.request_id]
            tokens = tuple(drafts[rid][:k])
            self._fed[rid] = (e.request.num_preemptions, e.start_position + 1, tokens[:-1])
            out[rid] = Draft(tokens, jnp.stack(probs[rid][:k]) if with_probs else None)
        return out
