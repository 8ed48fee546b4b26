"""Near-duplicate prompts and how diverse a value's prompts are.

At the paper's scale (tens of thousands of prompts) an LLM repeats itself in small variations ("a bloody
knight", "A bloody knight.", "knight, bloody"); exact-string checks miss them and they dilute the data.

    words(text)          lower case, punctuation and articles/prepositions dropped: the set compared
    NearDuplicates       add(id, text) -> the id of an earlier prompt it nearly repeats, or None
                         (Jaccard similarity of the word sets >= threshold). Candidates come from MinHash
                         LSH (64 hashes, 16 bands of 4: a pair at similarity 0.8 is a candidate with
                         probability 0.9998, one at 1.0 always), then the exact Jaccard decides: no false
                         rejection, and the cost per prompt does not grow with the number already kept.
    diversity(texts)     distinct prompts, mean pairwise similarity (a fixed sample of at most 400
                         prompts), distinct-2 (distinct word bigrams / all bigrams): stats.md per value
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import struct
from itertools import combinations

STOPWORDS = frozenset("a an the of in on at with and to for by from is are its into".split())
_PERMS, _BANDS = 64, 16
_ROWS = _PERMS // _BANDS


def words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS)


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@functools.lru_cache(maxsize=1 << 16)   # a vocabulary repeats: hash each word once
def _token_hashes(token: str) -> tuple[int, ...]:
    # 64 independent 32-bit hashes of a token: 4 blake2b digests of 64 bytes, personalised apart
    out: tuple[int, ...] = ()
    for k in range(_PERMS // 16):
        out += struct.unpack("<16I", hashlib.blake2b(token.encode(), digest_size=64, person=b"livo-mh%d" % k).digest())
    return out


def _signature(tokens: frozenset[str]) -> tuple[int, ...]:
    if not tokens:
        return (0,) * _PERMS
    hashes = [_token_hashes(t) for t in tokens]
    return tuple(min(h[i] for h in hashes) for i in range(_PERMS))


class NearDuplicates:
    """Incremental near-duplicate filter (see the module docstring)."""

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self._sets: dict[str, frozenset] = {}
        self._buckets: dict[tuple, list[str]] = {}

    def check(self, text: str) -> str | None:
        """The id of a kept prompt `text` nearly repeats (the most similar, earliest on ties), or None."""
        tokens = words(text)
        best, best_sim = None, -1.0
        for key in self._keys(tokens):
            for other in self._buckets.get(key, ()):
                sim = jaccard(tokens, self._sets[other])
                if sim >= self.threshold and sim > best_sim:
                    best, best_sim = other, sim
        return best

    def add(self, item_id: str, text: str) -> str | None:
        """Keep `text` under `item_id` unless it nearly repeats a kept prompt; returns that prompt's id then."""
        dup = self.check(text)
        if dup is None:
            tokens = words(text)
            self._sets[item_id] = tokens
            for key in self._keys(tokens):
                self._buckets.setdefault(key, []).append(item_id)
        return dup

    @staticmethod
    def _keys(tokens: frozenset) -> list[tuple]:
        sig = _signature(tokens)
        return [(b, sig[b * _ROWS:(b + 1) * _ROWS]) for b in range(_BANDS)]


def diversity(texts: list[str], sample: int = 400, seed: int = 0) -> dict:
    """Diversity figures of a list of prompts (see the module docstring)."""
    if not texts:
        return {"prompts": 0, "distinct": 0, "mean_similarity": None, "distinct_2": None}
    sets = [words(t) for t in texts]
    pick = sets if len(sets) <= sample else random.Random(seed).sample(sets, sample)
    sims = [jaccard(a, b) for a, b in combinations(pick, 2)]
    bigrams = [tuple(ws[i:i + 2]) for t in texts for ws in [re.findall(r"[a-z0-9]+", t.lower())] for i in range(len(ws) - 1)]
    return {"prompts": len(texts), "distinct": len({" ".join(sorted(s)) for s in sets}),
            "mean_similarity": round(sum(sims) / len(sims), 4) if sims else None,
            "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None,
            "similarity_sample": len(pick)}
