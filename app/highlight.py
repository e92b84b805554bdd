"""Which sentence of a shown passage to highlight before an answer exists: while the answer streams, and for every
kind of refusal (no passage above the threshold, passages without the question's key words, the model found no
answer) — the sentence closest in meaning to the question, so that a reader sees at once where the passage comes
nearest to what was asked and can judge the refusal.

    highlighter = QuestionHighlighter(embedder)
    highlighter.closest("zip 压缩包里最多能放多少个文件？", [h.text for h in hits])  # {1: "一个 zip 压缩包里最多…"}

Each sentence is scored by the e5 cosine between the question (`query: `) and the sentence (`passage: `), the
embedder already loaded for retrieval, plus a small bonus for the question's key words it contains
(`KEY_TERM_WEIGHT`; bench.highlight_cmrc measures semantic alone, key words alone and the two together, see
docs/benchmarks.md §10.4). A shown answer's passages are highlighted by the answer's content instead
(grounding.best_sentence_index); this module is for the moments without an answer. Sentence vectors are cached
(a passage shown again costs nothing), so a refusal's few dozen sentences cost one small embedding batch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from grounding.claims import normalize
from grounding.evidence import key_terms
from retrieval.sentences import split_sentences

# Score = cosine(question, sentence) + KEY_TERM_WEIGHT × share of the question's key words in the sentence.
# bench.highlight_cmrc (docs/benchmarks.md §10.4, CMRC trial, 921 one-sentence answers): semantic alone 0.659,
# key words alone 0.695, together 0.702 (0.05), 0.739 (0.2), 0.745 (0.3, then flat up to 3: key words with the
# cosine as tie-break). 0.2 is within 0.006 of the best and leaves the meaning more say on questions that do not
# reuse the document's words (CMRC questions were written from their answer sentence, which favours key words).
KEY_TERM_WEIGHT = 0.2
# Sentences shorter than this (letters and digits) are list bullets or headings: never the one to highlight while
# a longer sentence exists in the passage.
MIN_CHARS = 4
CACHE_SIZE = 4096


def _content_chars(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def term_share(terms: Sequence[str], sentence: str) -> float:
    """Share of `terms` written in `sentence` (normalised: full/half width, case)."""
    if not terms:
        return 0.0
    text = normalize(sentence)
    return sum(t in text for t in terms) / len(terms)


def pick(sentences: Sequence[str], scores: Sequence[float]) -> int | None:
    """Index of the best-scored sentence, the first on a tie; a sentence shorter than MIN_CHARS only when every
    sentence is, and never one without a letter or digit (None then)."""
    sizes = [_content_chars(t) for t in sentences]
    pool = [i for i, n in enumerate(sizes) if n >= MIN_CHARS] or [i for i, n in enumerate(sizes) if n]
    return max(pool, key=lambda i: (scores[i], -i)) if pool else None


class QuestionHighlighter:
    """The closest sentence of each passage to a question, by meaning (and key words). Thread-safe."""

    def __init__(self, embedder: Any | None, *, key_term_weight: float = KEY_TERM_WEIGHT,
                 cache_size: int = CACHE_SIZE) -> None:
        self.embedder = embedder
        self.key_term_weight = key_term_weight
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _vectors(self, sentences: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(s for s in sentences if s not in self._cache))
        if missing:
            fresh = np.asarray(self.embedder.encode_passages(missing), dtype=np.float32)
            with self._lock:
                for s, v in zip(missing, fresh, strict=True):
                    self._cache[s] = v
                    self._cache.move_to_end(s)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            found = {s: self._cache.get(s) for s in sentences}
        if any(v is None for v in found.values()):   # evicted by a concurrent caller: encode those again
            lost = [s for s, v in found.items() if v is None]
            for s, v in zip(lost, np.asarray(self.embedder.encode_passages(lost), dtype=np.float32), strict=True):
                found[s] = v
        return np.stack([found[s] for s in sentences])

    def scores(self, question: str, sentences: Sequence[str], *, semantic: bool = True,
               terms: bool = True) -> np.ndarray:
        """One score per sentence (higher = closer to the question). `semantic` / `terms` switch the two parts
        (the benchmark compares them); without an embedder only the key words count."""
        out = np.zeros(len(sentences), dtype=np.float64)
        if not sentences:
            return out
        if semantic and self.embedder is not None:
            q = np.asarray(self.embedder.encode_query(question), dtype=np.float32).reshape(-1)
            out += self._vectors(sentences) @ q
        if terms:
            words = key_terms(question)
            weight = self.key_term_weight if (semantic and self.embedder is not None) else 1.0
            out += weight * np.array([term_share(words, s) for s in sentences])
        return out

    def best_index(self, question: str, sentences: Sequence[str], **kw: bool) -> int | None:
        """Index of the closest sentence (short bullets and headings only when nothing longer exists)."""
        return pick(sentences, self.scores(question, sentences, **kw))

    def closest(self, question: str, passages: Sequence[str]) -> dict[int, str]:
        """{passage number (1-based, as on the page): its sentence closest to `question`}; the sentences of all
        passages are embedded in one batch."""
        split = [split_sentences(p) for p in passages]
        flat = [s for sents in split for s in sents]
        if not flat:
            return {}
        scores = self.scores(question, flat)
        out, at = {}, 0
        for n, sents in enumerate(split, 1):
            best = pick(sents, scores[at: at + len(sents)])
            if best is not None:
                out[n] = sents[best]
            at += len(sents)
        return out
