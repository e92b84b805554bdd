"""BM25 over jieba words and character bigrams (bm25s does the scoring); the per-generation cache of these indexes is
in retriever.py.

Chinese has no spaces, so text is cut with jieba's search mode (long words and their sub-words, e.g.
中华人民共和国 → 中华 / 人民 / 共和国 / 中华人民共和国), so a question that writes a shorter or longer form of a
name still matches. Punctuation, whitespace and common function words (bm25s' Chinese stopword list plus question
words such as 什么 / 哪里) carry no topic and are dropped: they would otherwise make every chunk "match" a question.
Character bigrams are added to the words: names and terms missing from jieba's dictionary are cut unpredictably
(范廷颂于 as one word), and bigrams still match them. On CMRC trial with near-miss noise words + bigrams beat either
alone (docs/benchmarks.md, "BM25 tokenisation").
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import bm25s
import jieba
import numpy as np
from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN

from retrieval.types import Chunk

jieba.setLogLevel(logging.WARNING)  # jieba prints its dictionary loading to stderr otherwise

# Question words and particles that the bm25s list lacks; they appear in questions, not in the answers' passages.
_EXTRA_STOPWORDS = frozenset(
    "哪 哪里 哪儿 哪些 哪个 哪位 哪年 谁 几 多少 怎么 怎样 如何 为何 是否 "
    "吗 呢 吧 啊 呀 的 地 得 了 着 过 是 在 有 和 与 及 或".split()
)
STOPWORDS: frozenset[str] = frozenset(STOPWORDS_CHINESE) | frozenset(STOPWORDS_EN) | _EXTRA_STOPWORDS

# A token worth indexing has at least one letter, digit or CJK character (drops punctuation and spaces).
_WORDLIKE = re.compile(r"[\w\u3400-\u9fff]")


def word_tokens(text: str) -> list[str]:
    """jieba search-mode tokens, lower-cased, without punctuation, whitespace or stopwords.

    >>> word_tokens("中华人民共和国成立于1949年。")
    ['中华', '华人', '人民', '共和', '共和国', '中华人民共和国', '成立', '1949', '年']
    """
    out = []
    for tok in jieba.cut_for_search(text):
        tok = tok.strip().lower()
        if tok and _WORDLIKE.search(tok) and tok not in STOPWORDS:
            out.append(tok)
    return out


_CJK_RUN = re.compile(r"[\u3400-\u9fff]+")


def char_bigrams(text: str) -> list[str]:
    """Overlapping pairs of Chinese characters (runs of CJK text only; Latin words and numbers come from jieba).
    No dictionary: a name or term jieba does not know still matches (范廷颂 → 范廷 / 廷颂).

    >>> char_bigrams("范廷颂于1990年")
    ['@范廷', '@廷颂', '@颂于']
    """
    out = []
    for run in _CJK_RUN.findall(text):
        out.extend("@" + run[i:i + 2] for i in range(len(run) - 1))
    return out


# The one tokenisation of BM25: jieba words plus character bigrams (prefixed "@" so a bigram never collides with a
# two-character word). Knowledge bases store each chunk's tokens (retrieval/segments.py). Change this whenever
# `tokenize` changes what it returns for some text: segments made by another version are re-tokenised once (in memory
# when opened, on disk at the next commit), so stored tokens never disagree with the tokens of a question.
TOKENIZER_VERSION = "jieba-search-cjk-bigram-2"


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of `text`: word_tokens(text) + char_bigrams(text).

    >>> tokenize("范廷颂于1990年")
    ['范廷颂于', '1990', '年', '@范廷', '@廷颂', '@颂于']
    """
    return word_tokens(text) + char_bigrams(text)


class BM25Index:
    """A BM25 index over the chunks' embedding text (heading path + text); row i is chunks[i]."""

    # Never produced by `tokenize`: stands in for a chunk with no indexable token so bm25s keeps row numbers aligned.
    _EMPTY = "\x00"

    def __init__(self, chunks: Sequence[Chunk], *, k1: float = 1.2, b: float = 0.75,
                 tokenizer: Callable[[str], list[str]] = tokenize) -> None:
        self.size = len(chunks)
        self.tokenizer = tokenizer
        self._bm25: bm25s.BM25 | None = None
        if not chunks:
            return
        corpus = [tokenizer(c.embedding_text()) or [self._EMPTY] for c in chunks]
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for `query` (zeros when no query token occurs in the corpus)."""
        if self._bm25 is None:
            return np.zeros(0, dtype=np.float32)
        ids = self._bm25.get_tokens_ids(self.tokenizer(query))
        if not ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The best `k` rows with a positive score, best first, as (row, score)."""
        return top_positive(self.scores(query), k)


def top_positive(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The best `k` rows of `scores` with a positive score, best first, as (row, score); ties keep row order.

    >>> top_positive(np.array([0.0, 2.0, 1.0, 2.0], dtype=np.float32), 2)
    [(1, 2.0), (3, 2.0)]
    """
    if k <= 0 or not scores.size:
        return []
    k = min(k, scores.size)
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(i), float(scores[i])) for i in top if scores[i] > 0]
