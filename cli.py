"""Terminal chat with a knowledge base: streamed answers, then the passages they came from.

    python cli.py --kb default                       # interactive; Ctrl-C stops an answer, Ctrl-D (or "exit") quits
    python cli.py --kb default --question "生命数耗完即算为什么？"   # one question, then exit (status 1 on error)

Settings come from configs/ as everywhere else (ZHIWEN_PROFILE, --config or ZHIWEN_CONFIG,
ZHIWEN_<SECTION>__<KEY>); a settings mistake exits with status 2 and one sentence.
"""
from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

PASSAGE_PREVIEW_CHARS = 80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="知问 terminal chat: ask questions about a knowledge base.")
    ap.add_argument("--kb", required=True, help="knowledge base name (see knowledge_base/)")
    ap.add_argument("--question", "-q", help="ask one question and exit")
    ap.add_argument("--top-k", type=int, help="passages to retrieve (retrieval.top_k)")
    ap.add_argument("--threshold", type=float, help="evidence threshold (retrieval.score_threshold)")
    ap.add_argument("--temperature", type=float, help="0 = greedy (llm.temperature)")
    ap.add_argument("--max-new-tokens", type=int, help="answer length limit (llm.max_new_tokens)")
    ap.add_argument("--history-turns", type=int, help="earlier turns sent to the model (prompt.history_turns)")
    ap.add_argument("--config", help="a YAML settings file merged over configs/default.yaml (like ZHIWEN_CONFIG)")
    return ap.parse_args(argv)


def print_sources(stream: Any) -> None:
    hits = stream.sources if not stream.refused else stream.low_relevance
    if not hits:
        return
    refusal = getattr(stream, "refusal", None)
    print("\n最接近的段落（未作为依据）：" if stream.refused else "\n来源：")
    # a refusal of any kind but the grounding check's: each passage's sentence closest to the question
    closest = stream.question_evidence if refusal is not None and refusal.reason != "ungrounded" else {}
    for i, h in enumerate(hits, start=1):
        where = h.source + (f" 第{h.page}页" if h.page is not None else "")
        where += f" · {' > '.join(h.heading_path)}" if h.heading_path else ""
        score = f"{h.dense_score:.3f}" if h.dense_score is not None else f"{h.score:.3f}"
        text = " ".join(h.text.split())
        more = "…" if len(text) > PASSAGE_PREVIEW_CHARS else ""
        print(f"  [{i}] {where}（相似度 {score}）\n      {text[:PASSAGE_PREVIEW_CHARS]}{more}")
        if closest.get(i):
            print(f"      最接近问题的句子：{closest[i]}")


def ask(service: Any, question: str, kb: str, history: list[tuple[str, str]], params: Any) -> str | None:
    """Stream one answer to stdout. Ctrl-C stops the generation (the partial answer is kept). Returns the answer."""
    stop = threading.Event()
    stream = service.answer(question, kb, history, params, stop_event=stop)
    try:
        for piece in stream:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()                          # the generation thread ends at its next token
        print(" [已停止 / stopped]", end="")
    print()
    if stream.error:
        print(f"错误 / error: {stream.error}", file=sys.stderr)
    elif stream.refusal is not None:        # which rule refused: retrieval, the model, or the grounding check
        print(stream.refusal.message)
    print_sources(stream)
    return None if stream.refused or stream.error else stream.text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from configs import SettingsError, load_settings

    try:  # before the models' libraries are imported: a settings mistake is one sentence, at once
        settings = load_settings(args.config)
    except SettingsError as e:
        print(f"设置有误 / settings error: {e}", file=sys.stderr)
        return 2
    from app.service import AnswerParams, QAError, QAService
    from llm import LLMError
    from retrieval.embeddings import EmbedderError

    try:
        params = AnswerParams(top_k=args.top_k, threshold=args.threshold, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, history_turns=args.history_turns)
    except QAError as e:                    # a bad flag value: the same sentence as on the page and the API
        print(f"错误 / error: {e}", file=sys.stderr)
        return 2
    try:
        service = QAService(settings)
        service.knowledge_base(args.kb)     # an unknown KB fails before the models load
        print("正在加载模型… / loading models…", file=sys.stderr, flush=True)
        service.warm_up()
        info = service.info
        print(f"模型 {info.name} · {info.engine} · {info.device} · {info.quantization}", file=sys.stderr)
        if info.notice:
            print(info.notice, file=sys.stderr)
        if args.question:
            ask(service, args.question, args.kb, [], params)
            return 0
        history: list[tuple[str, str]] = []
        print(f"知识库「{args.kb}」。输入问题回车；Ctrl-C 停止回答，Ctrl-D 或 exit 退出。", file=sys.stderr)
        while True:
            try:
                question = input("\n问> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if question in ("exit", "quit", "退出"):
                return 0
            if not question:
                continue
            try:
                answer = ask(service, question, args.kb, history, params)
            except QAError as e:
                print(f"错误 / error: {e}", file=sys.stderr)
                continue
            if answer:
                history.append((question, answer))
    except (QAError, LLMError, EmbedderError) as e:
        print(f"错误 / error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
