"""Which sentence of a passage supports an answer, and how well a sentence matches a question.

After an answer exists, the supporting sentence is found by the answer's content: the sentence that states most of
the answer's numbers, dates and entities, then the one sharing most of the answer's wording (`best_sentence`).
Before an answer exists (or for a refusal) the closest candidate is the sentence most similar in meaning to the
question (`rank_by_question`, with the product's embedder), not the one that happens to share a question word.

    >>> best_sentence("上传请点击按钮。一个 zip 压缩包里最多 2000 个文件。", "最多 2000 个")
    '一个 zip 压缩包里最多 2000 个文件。'
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.text import char_bigrams
from grounding.claims import Claim, _cn_dates_to_digits, _entities, extract_claims, normalize, strip_markers, supports
from retrieval.sentences import sentence_ends, split_sentences

# Question words and particles that say nothing about what is asked (on top of the BM25 stopwords).
_QUESTION_WORDS = frozenset("什么 多少 哪些 哪个 哪里 哪儿 哪年 哪位 为什么 怎么 怎样 如何 是否 是不是 可以 能否 "
                            "请问 一下 有没有 几个 几年 几次 几种 时候 主要 一个".split())
# Words that ask for the answer's form, not its content (「请详细列出…，逐条说明」): a passage need not contain them, so
# they must not count against it (a verbose question about the upload limits was refused before the LLM).
_REQUEST_WORDS = frozenset("详细 具体 简要 简单 简述 列出 列举 逐条 一条 每条 每一条 分别 全部 所有 展开 "
                           "说明 介绍 解释 描述 概括 总结 告诉 回答 讲讲 谈谈 举例".split())


# Pointing and counting words are no content either: 这所/这场/那些/哪一年/每个/哪些地方/一共 (a demonstrative
# or question word, an optional 一 and measure word, an optional generic noun), whatever the question is about.
_DEICTIC = re.compile(r"^[这那哪每各某该此本]一?[个些种位所场次件条名家座部本年天月日里儿边样般类项门届任代首]?"
                      r"(?:地方|时候|时间|国家|方面|东西|人)?$")
_COUNTING = frozenset("一共 总共 共计 总计 一起 一般 一定 到底 究竟 当时 目前 现在 最终".split())
_CN_NUMERAL = re.compile(r"[零〇一二两三四五六七八九十百千万]{2,}|[一二三四五六七八九十](?=[世年月日号岁个次])")


def _digit_form(term: str) -> str:
    """The term with its Chinese numerals as digits (十九世纪 → 19世纪, 六十年代 → 60年代); else the term."""
    from grounding.claims import number_value

    def conv(m: re.Match) -> str:
        v = number_value(m.group(0))
        return str(int(v)) if v is not None and v == int(v) else m.group(0)
    return _CN_NUMERAL.sub(conv, term)


# Words that ask for a name: a passage answers 「…又称之为什么？」 with 又名/别称/俗称…, so any of them stands for
# any other.
NAMING_WORDS = frozenset("称之为 被称作 称作 称为 被称为 被称之为 俗称 别称 又称 也称 亦称 简称 通称 统称 史称 人称 "
                         "号称 名为 叫做 称呼 别名 又名 名叫 译名 学名".split())


def term_in(term: str, text: str, grams: set[str] | None = None) -> bool:
    """Is key term `term` written in normalised `text`: as is, with its numerals as digits, as another naming word
    (NAMING_WORDS: 称之为 ~ 又名), or — when `grams` (the text's character pairs) are given and the word has three
    characters or more — with most of its character pairs there (任命为 ~ 被任命; a name jieba cut differently)."""
    if term in text or _digit_form(term) in text:
        return True
    if term in NAMING_WORDS and any(w in text for w in NAMING_WORDS):
        return True
    if grams is not None and len(term) >= 3:
        tg = char_bigrams(_alnum(term))
        return len(tg & grams) / len(tg) >= 0.5
    return False


# A sentence that states none of the answer's claims must share at least this share of the answer's character pairs
# to be highlighted (one shared common word such as 文件 is not support).
MIN_SHARED = 0.25


def _alnum(text: str) -> str:
    """`text` normalised (claims.normalize) with only letters and digits left: what bigrams are compared on."""
    return "".join(ch for ch in normalize(text) if ch.isalnum())


def best_sentence(passage: str, answer: str, *, claims: Sequence[Claim] | None = None) -> str:
    """The passage's sentence that supports `answer` best ("" when none shares anything with it)."""
    idx = best_sentence_index(split_sentences(passage), answer, claims=claims)
    return "" if idx is None else split_sentences(passage)[idx]


def best_sentence_index(sentences: Sequence[str], answer: str, *, claims: Sequence[Claim] | None = None) -> int | None:
    answer = strip_markers(answer)
    claims = extract_claims(answer) if claims is None else claims
    grams = char_bigrams(_alnum(answer))
    whole = normalize(answer).strip("。，,.！!？?；;")
    best, best_score = None, MIN_SHARED - 1e-9
    for i, s in enumerate(sentences):
        held = sum(supports(s, c) for c in claims)
        shared = len(grams & char_bigrams(_alnum(s))) / max(1, len(grams))
        # a short answer written verbatim in the sentence (an extracted span) outranks everything else
        verbatim = 5.0 if len(whole) >= 2 and whole in normalize(s) else 0.0
        score = verbatim + 3.0 * held + shared
        if score > best_score + 1e-9:
            best, best_score = i, score
    return best


def key_terms(question: str, *, exclude: Sequence[str] = ()) -> list[str]:
    """The words of the question that name what is asked (jieba words of two characters or more, without stopwords
    and question words). key_terms("范廷颂是什么时候被任命为主教的？") -> ['范廷颂', '任命', '主教']."""
    import jieba

    from retrieval.bm25 import STOPWORDS

    skip = {normalize(x) for x in exclude}
    out = []
    for w in jieba.lcut(normalize(question)):
        if (len(w) < 2 or w in STOPWORDS or w in _QUESTION_WORDS or w in _REQUEST_WORDS or w in _COUNTING
                or w in skip or _DEICTIC.match(w) or not any(ch.isalnum() for ch in w)):
            continue
        if w not in out:
            out.append(w)
    return out


def key_term_coverage(question: str, passage: str) -> float:
    """Share of the question's key terms written in `passage` (1.0 when the question has fewer than two).

    >>> key_term_coverage("范廷颂是什么时候被任命为主教的？", "范廷颂于1963年被任命为主教。")
    1.0
    """
    terms = key_terms(question)
    if len(terms) < 2:      # one word decides nothing: a paraphrase of it would refuse a fine question
        return 1.0
    text = normalize(passage)
    # exact words (and numerals as digits) only: the pair tolerance of term_coverage lets 3.4 points of near misses
    # through on CMRC for 0.3 points fewer false refusals (docs/benchmarks.md §10.6)
    return sum(term_in(t, text) for t in terms) / len(terms)


# Names a question is about: people, organisations, other proper nouns, Latin words, 《titles》 (jieba's tags). Places
# are left to the grounding check's place constraint: jieba tags common words as places (「运东西」 → 东西/ns), and a
# paraphrased question was refused for it (bench.paraphrase_coverage).
NAME_FLAGS = frozenset({"nr", "nrfg", "nrt", "nt", "nz", "eng", "title"})


def missing_names(question: str, passages: Sequence[str]) -> list[str]:
    """The names in `question` (NAME_FLAGS) that none of `passages` writes: the question is about something the
    passages are not (another company's growth rate, a sister species' range).

    jieba splits unknown names wrongly (「拉诺米」 → 拉诺 + 米, 「西贡商信银行」 → …商信…), so a name counts as written
    when the passages hold it or a run of at least half of its characters; a Latin name (mixed case: iPhone, Glade)
    must be there whole — a Latin word in capitals (GDP, Q3) is an abbreviation a passage may spell out, one in
    lower case (zip, wifi) a common word; a model code (A-135, F-16), which jieba does not tag, is a name, with or
    without its hyphen.

    >>> missing_names("比亚迪2023年的营收增长率是多少？", ["华为2023年营收增长率为10%。"])
    ['比亚迪']
    >>> missing_names("华为2023年的营收增长率是多少？", ["华为2023年营收增长率为10%。"])
    []
    """
    text = normalize(_cn_dates_to_digits("\n".join(passages)))      # as the question: 《神圣十月》 → 神圣10月
    asked = unicodedata.normalize("NFKC", question)
    out = []
    for word, flag, _ in _entities(normalize(_cn_dates_to_digits(question))):
        if flag not in NAME_FLAGS or word in text or word in out:
            continue
        if flag == "eng":        # a name is in mixed case (iPhone, Glade); GDP, Q3 are abbreviations, zip a word
            m = re.search(re.escape(word), asked, re.IGNORECASE)
            if m is None or not (any(ch.islower() for ch in m.group()) and any(ch.isupper() for ch in m.group())):
                continue
        if word.isascii() or not _piece_in(word, text):
            out.append(word)
    for word in organisation_names(question):     # 小米集团: jieba tags 小米 as a noun (millet)
        if word not in out and not _piece_in(word, text):
            out.append(word)
    for m in _MODEL_CODE.finditer(asked):       # A-135, F-16, DC-9: a model's name, which jieba does not tag
        code = m.group().lower()
        if not _PERIOD_CODE.match(code) and code not in out and code not in text and code.replace("-", "") not in text:
            out.append(code)
    return out


# Words that end an organisation's name: the noun before them names it (小米集团, 星河科技有限公司, 理想汽车).
ORG_SUFFIXES = frozenset("公司 有限公司 股份有限公司 集团 控股 股份 银行 科技 汽车 证券 保险 基金 医药 制药 电子 电器 "
                         "电气 能源 地产 置业 航空 物流 食品 传媒 网络 软件 通信 实业 工业".split())
_ORG_CORE_FLAGS = ("n", "nr", "nrt", "nrfg", "nz", "nt", "ns", "eng", "j")


def organisation_names(question: str) -> list[str]:
    """Names of organisations in `question` that jieba does not tag as names: the noun(s) right before an
    ORG_SUFFIXES word (「小米集团」 → 小米, 「星河科技有限公司」 → 星河; not 「该公司」, 「保险公司」, 「汽车公司」)."""
    import jieba.posseg as pseg

    words = [(w.word, w.flag) for w in pseg.cut(normalize(question))]
    out = []
    for i, (word, _flag) in enumerate(words):
        if word not in ORG_SUFFIXES or (i + 1 < len(words) and words[i + 1][0] in ORG_SUFFIXES):
            continue
        j = i
        while j > 0 and words[j - 1][0] in ORG_SUFFIXES:
            j -= 1
        k = j
        while k > 0 and words[k - 1][1] in _ORG_CORE_FLAGS and words[k - 1][0] not in ORG_SUFFIXES:
            k -= 1
        core = "".join(w for w, _ in words[k:j])
        if len(core) >= 2 and not core.isdigit() and core not in out:
            out.append(core)
    return out


def _piece_in(word: str, text: str) -> bool:
    """Is a run of at least half of `word`'s characters written in `text`? 「以兆康苑」 → 兆康苑; not 「王爱爱」 for a
    passage that only has 王 and 爱 in other words. A word of two characters needs one of them: jieba's wrong cuts
    across a name's edge are mostly two characters (「…巴利冈是哪国」 → 冈是, 「西贡商信银行」 → 商信)."""
    if len(word) <= 2:
        return any(ch in text for ch in word)
    size = (len(word) + 1) // 2
    return any(word[i:i + size] in text for i in range(len(word) - size + 1))


# Letters then digits, with or without a hyphen: a model or product code (A-135, F-16, DC-9, RTX4090). Quarter
# and half-year codes (Q3, H1) are times, not names.
_MODEL_CODE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{1,4}-?\d{1,5}[A-Za-z]?(?![A-Za-z0-9])")
_PERIOD_CODE = re.compile(r"^[qh]\d$")


def term_coverage(terms: Sequence[str], passage: str, sentence: str, *, also: str = "") -> float:
    """Share of `terms` written in `sentence` or the sentences right before and after it in `passage` (a word of
    three characters or more also counts when most of its character pairs are there: 任命为 ~ 被任命), or in
    `also` (normalised text that speaks for the passage: its file's other passages and labels)."""
    sents = split_sentences(passage)
    at = passage.find(sentence) if sentence else -1
    if sentence in sents:
        i = sents.index(sentence)
        window = "".join(sents[max(0, i - 1): i + 2])
    elif at >= 0:                # several sentences (a quote): them and one sentence either side
        ends = [0] + sentence_ends(passage)
        before = [e for e in ends if e <= at]
        after = [e for e in ends if e >= at + len(sentence)]
        lo = before[-2] if len(before) >= 2 else 0
        hi = after[1] if len(after) >= 2 else len(passage)
        window = passage[lo:hi]
    else:
        window = sentence
    hay = normalize(window)
    grams = char_bigrams(_alnum(window))
    return (sum(term_in(t, hay, grams) or (bool(also) and term_in(t, also)) for t in terms) / len(terms)
            if terms else 1.0)


def rank_by_question(sentences: Sequence[str], question: str, embedder: Any) -> list[int]:
    """Sentence indexes, most similar in meaning to `question` first (the embedder's query/passage encodings)."""
    if not sentences:
        return []
    q = np.asarray(embedder.encode_query(question), dtype=np.float32).reshape(-1)
    vecs = np.asarray(embedder.encode_passages(list(sentences)), dtype=np.float32)
    return [int(i) for i in np.argsort(-(vecs @ q), kind="stable")]


# What kind of thing a question asks for, from its question word (checked in this order: 哪年 is a date, not a number).
_ASKED = (
    ("date", re.compile(r"什么时候|何时|哪一?年|哪一?天|哪个月|几月|几号|几日|什么时间|哪个时期|年份|日期")),
    ("number", re.compile(r"多少|几|多[大长高重远久宽深厚快]|第几|百分之")),
    ("person", re.compile(r"谁|哪位|哪一位|什么人")),
    ("place", re.compile(r"哪里|哪儿|什么地方|在哪|哪个(?:国家|城市|省|地区|地方)|哪座")),
)
# A sentence "scores as an answer" when it holds at least this share of the question's key terms (with its
# neighbours) and a number/date/name of the asked kind that the question does not already state.
MIN_CANDIDATE_COVERAGE = 0.6


def asked_kind(question: str) -> str | None:
    """asked_kind("范廷颂是什么时候被任命为主教的？") -> "date"; "…有多少个文件？" -> "number"; None for others."""
    q = normalize(question)
    return next((kind for kind, pat in _ASKED if pat.search(q)), None)


def _holds_kind(sentence: str, kind: str, question: str) -> bool:
    from grounding.claims import PLACE_FLAGS, _entities

    claims = extract_claims(sentence, ignore=question)
    if kind == "date":
        return any(c.kind == "date" for c in claims)
    if kind == "number":
        return any(c.kind in ("number", "date") for c in claims)
    flags = PLACE_FLAGS if kind == "place" else {"nr", "nrfg", "nrt"}
    asked = normalize(question)
    return any(f in flags and w not in asked for w, f, _ in _entities(normalize(sentence)))


def answer_candidate(question: str, passages: Sequence[str], *, top: int = 1) -> tuple[int, str] | None:
    """(1-based passage, sentence) of the first of the `top` passages holding a sentence that scores as an answer to
    `question`, else None. A model refusal while such a sentence is there is a likely false refusal.

    A question asking for a number, date, person or place (asked_kind): a sentence with a thing of that kind which
    the question does not already state, and MIN_CANDIDATE_COVERAGE of the key terms around it. Any other question
    (什么/哪个/为什么…): a sentence with all of its key terms (two or more) around it.

    >>> answer_candidate("zip 压缩包里最多能放多少个文件？", ["一个 zip 压缩包里最多 2000 个文件。"])
    (1, '一个 zip 压缩包里最多 2000 个文件。')
    """
    kind = asked_kind(question)
    terms = key_terms(question)
    if len(terms) < 2:
        return None
    need = MIN_CANDIDATE_COVERAGE if kind is not None else 1.0
    for i, passage in enumerate(passages[:top], start=1):
        best, best_cov = None, need - 1e-9
        for s in split_sentences(passage):
            if kind is not None and not _holds_kind(s, kind, question):
                continue
            cov = term_coverage(terms, passage, s)
            if cov > best_cov:
                best, best_cov = s, cov
        if best is not None:
            return i, best
    return None
