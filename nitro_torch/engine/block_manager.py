"""The KV block pool: allocation, reference counts and the prefix cache. Plain Python, no tensors.

A full block is keyed by a digest chained over (previous block's digest, its token ids), so equal keys mean
equal prefixes. The digest is cryptographic (BLAKE2b) because the cache is shared between users: with a
cheap hash one user could craft a collision and be served another user's cached prompt.
Freed blocks keep their key and sit in an LRU free list until a new allocation evicts them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from nitro_torch.engine.request import Request

BlockKey = bytes


def chain_block_key(previous: BlockKey | None, token_ids: list[int]) -> BlockKey:
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None


@dataclass
class PrefixHit:
    block_ids: list[int]
    """Blocks shared as they are (their reference count goes up)."""
    num_tokens: int
    """Tokens whose K/V are in place after allocation (shared blocks plus the copied partial block)."""
    copy_from: int | None = None
    """A partial block whose contents are copied into a fresh block of the new request (forks only)."""


@dataclass
class BlockStats:
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}
        self._request_keys: dict[str, list[BlockKey]] = {}
        self._published: dict[str, int] = {}
        """Request id -> how many of its leading full blocks cache_full_blocks has already published."""
        self.pending_copies: list[tuple[int, int]] = []
        """(source, destination) block copies the runner must do before the next forward."""
        self.stats = BlockStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks no live request references (some may still hold a cached prefix)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix_hit(self, request: Request) -> PrefixHit:
        """Longest run of cached full blocks at the start of the request; the last token is always recomputed."""
        if not self.enable_prefix_caching:
            return PrefixHit([], 0)
        keys = self._keys_for(request, request.num_tokens - 1)
        hit: list[int] = []
        for key in keys:
            block_id = self._cached.get(key)
            if block_id is None:
                break
            hit.append(block_id)
        return PrefixHit(hit, len(hit) * self.block_size)

    def fork_hit(self, parent: Request, child: Request) -> PrefixHit:
        """Share a parent's computed prompt with a child that has the same prompt (n > 1 choices).

        The child takes the parent's full prompt blocks and a copy of the block holding the last prompt
        token, and recomputes only that token, so it gets its own logits to sample its first token from.
        """
        if parent.num_computed_tokens < child.num_prompt_tokens:
            raise ValueError("the parent has not computed the prompt yet")
        kept = child.num_prompt_tokens - 1
        num_shared, partial = divmod(kept, self.block_size)
        copy_from = parent.block_ids[num_shared] if partial else None
        return PrefixHit(parent.block_ids[:num_shared], kept, copy_from)

    def can_allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        if hit is None and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size:
            return True  # fits in the blocks it has (most decode steps)
        hit_blocks = hit.block_ids if hit else []
        computed = hit.num_tokens if hit else request.num_computed_tokens
        total = self.blocks_needed(computed + num_new_tokens)
        fresh = total - len(request.block_ids) - len(hit_blocks)
        revived = sum(1 for b in hit_blocks if self.blocks[b].ref_count == 0)
        return fresh + revived <= len(self._free)

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None) -> None:
        """Give the request blocks for `num_new_tokens` more tokens, taking prefix-hit blocks first."""
        if hit is None and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size:
            return
        if not self.can_allocate(request, num_new_tokens, hit):
            raise MemoryError("not enough free KV blocks")
        if hit is not None:
            for block_id in hit.block_ids:
                self._take(block_id)
            request.block_ids.extend(hit.block_ids)
            if hit.copy_from is not None:
                copy = self._take_fresh()
                request.block_ids.append(copy)
                self.pending_copies.append((hit.copy_from, copy))
            request.num_computed_tokens = hit.num_tokens
        total = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        while len(request.block_ids) < total:
            request.block_ids.append(self._take_fresh())

    def record_prefix_lookup(self, request: Request, hit: PrefixHit) -> None:
        self.stats.prefix_query_tokens += request.num_tokens
        self.stats.prefix_hit_tokens += hit.num_tokens
        request.num_cached_tokens = hit.num_tokens

    def cache_full_blocks(self, request: Request, num_computed: int | None = None) -> None:
        """Publish the request's computed full blocks (of its first `num_computed` tokens, by default all it has
        computed) so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        if num_computed is None:
            num_computed = request.num_computed_tokens
        num_full = num_computed // self.block_size
        published = self._published.get(request.request_id, 0)
        if num_full <= published:
            return  # no block filled up since the last call (most decode steps)
        self._published[request.request_id] = num_full
        keys = self._keys_for(request, num_full * self.block_size)
        for key, block_id in zip(keys[published:], request.block_ids[published:]):
            block = self.blocks[block_id]
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block_id

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks go to the free list first so prefixes live longest."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.key is None:  # holds nothing reusable: hand it out before any cached prefix
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        request.num_computed_tokens = 0
        self._request_keys.pop(request.request_id, None)
        self._published.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.key = None
        self._cached.clear()
        self._published.clear()

    def _keys_for(self, request: Request, num_tokens: int) -> list[BlockKey]:
        """Keys of the request's first num_tokens // block_size blocks, computed once per block."""
        keys = self._request_keys.setdefault(request.request_id, [])
        bs = self.block_size
        wanted = num_tokens // bs
        while len(keys) < wanted:
            start = len(keys) * bs
            chunk = [request.token_at(i) for i in range(start, start + bs)]
            keys.append(chain_block_key(keys[-1] if keys else None, chunk))
        return keys[:wanted]

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:
            if self._cached.get(block.key) == block_id:
                del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id
