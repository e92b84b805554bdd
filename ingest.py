"""Ingest a folder of documents into a knowledge base:

    python ingest.py docs/ [--kb NAME] [--prune] [--rebuild] [--retry-failed]
    python ingest.py --repair --kb NAME      # point a damaged KB's CURRENT at its newest complete generation

Exit status: 0 every file is in the knowledge base, 1 some files failed (the others are committed),
2 nothing was done (bad folder, knowledge-base name or settings; KB locked by another writer; KB needs --rebuild;
KB damaged: the message names the repair).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python ingest.py",
                                description="把一个文件夹里的文档导入知识库（增量：只处理新增和改动的文件）。")
    p.add_argument("folder", type=Path, nargs="?", help="要导入的文件夹（递归扫描，跳过隐藏文件）；--repair 时不需要")
    p.add_argument("--kb", default="default", help="知识库名称（默认 default）")
    p.add_argument("--prune", action="store_true", help="从知识库删除这个文件夹里已不存在的文件")
    p.add_argument("--rebuild", action="store_true", help="丢弃该知识库，按当前设置从这个文件夹重新建库")
    p.add_argument("--retry-failed", action="store_true",
                   help="重新解析上次失败或没有文本的文件，即使文件没有变化（例如安装了 antiword、开启了 OCR 之后）")
    p.add_argument("--repair", action="store_true",
                   help="修复损坏的知识库：把 CURRENT 指回最新的完整版本（不导入文件，不删除任何版本）")
    p.add_argument("--config", type=Path, help="设置文件（YAML），叠加在 configs/default.yaml 之上")
    p.add_argument("--quiet", action="store_true", help="不显示进度条，只列出失败和无文本的文件与汇总")
    args = p.parse_args(argv)
    if args.folder is None and not args.repair:
        p.error("缺少要导入的文件夹（修复知识库请用 --repair --kb 名称）")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    from configs import SettingsError, load_settings

    try:  # before the parsers and models are imported: a settings mistake is one sentence, at once
        settings = load_settings(args.config)
    except SettingsError as e:
        print(f"设置有误：{e}", file=sys.stderr)
        return 2
    from ingest import ingest
    from retrieval.embeddings import EmbedderError
    from retrieval.store import KBError, repair_knowledge_base

    try:
        if args.repair:
            print(repair_knowledge_base(args.kb, settings).describe())
            return 0
        report = ingest(args.folder, args.kb, settings, prune=args.prune, rebuild=args.rebuild,
                        retry_failed=args.retry_failed, show_progress=not args.quiet)
    except (KBError, EmbedderError) as e:  # bad folder / KB name, lock held, needs --rebuild; model missing
        print(f"错误：{e}", file=sys.stderr)
        return 2
    print(report.to_table(only_problems=args.quiet))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
