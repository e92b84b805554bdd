"""The intranet page (Gradio 6 Blocks): 问答 (chat), 知识库管理 (knowledge bases), 检索测试 (retrieval test).

Layout first, then thin handlers: each makes one call to the QA service, the job manager or app.library and turns
the answer into component values. Every handler catches errors and shows a sentence a person can act on
(`_friendly`, with app.errors.friendly_error); the traceback goes to the server log only. Document text reaches the
page only through app.render, which escapes it.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from . import library, render
from .context import AppContext
from .errors import friendly_error
from .service import AnswerParams

log = logging.getLogger(__name__)

FONTS = ["Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Microsoft YaHei", "WenQuanYi Micro Hei",
         "system-ui", "sans-serif"]
MONO_FONTS = ["Noto Sans Mono CJK SC", "DejaVu Sans Mono", "Consolas", "monospace"]

CSS = """
.zw-status {font-size: 0.9em; opacity: 0.85}
.zw-refusal {border-left: 4px solid #d97706; background: #fff7ed; color: #9a3412; padding: 6px 10px; border-radius: 4px}
.zw-stopped {font-size: 0.85em; color: #6b7280; margin-top: 4px}
.zw-cite {color: #2563eb; cursor: pointer; font-size: 0.85em; vertical-align: super}
.zw-hit.zw-cited {border-color: #2563eb; box-shadow: 0 0 0 2px #bfdbfe}
.zw-ungrounded details {margin-top: 4px; color: #6b7280}
.zw-error {border-left: 4px solid #dc2626; background: #fef2f2; color: #991b1b; padding: 6px 10px; border-radius: 4px}
.zw-sources-title {font-weight: 600; margin-bottom: 6px}
.zw-weak .zw-sources-title {color: #9a3412}
.zw-note {font-size: 0.9em; color: #6b7280; margin-bottom: 6px}
.zw-note.zw-after {margin: 4px 0 0 0}
.zw-hit {border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px; margin-bottom: 8px}
.zw-hit-head {font-size: 0.85em; color: #374151; margin-bottom: 4px}
.zw-score {display: block; color: #6b7280; font-size: 0.95em}
.zw-passage {font-size: 0.92em; line-height: 1.6; white-space: normal}
.zw-passage mark {background: #fde68a; padding: 0 1px}
.zw-passage mark.zw-q, .zw-legend mark.zw-q {background: #dbeafe; padding: 0 1px}
.zw-uncited {text-decoration: underline dotted #9ca3af; text-underline-offset: 3px}
.zw-cite-bad {color: #9ca3af; text-decoration: line-through; font-size: 0.85em; vertical-align: super}
.zw-cite-note {font-size: 0.8em; color: #9ca3af; margin-top: 4px}
.zw-job table {width: 100%; font-size: 0.9em; margin-top: 6px}
.zw-job progress {width: 100%}
.zw-status-failed td, .zw-status-rejected td {color: #b91c1c}
"""

# The sources panel's title for a refusal by retrieval (AnswerStream.refusal.reason; the note below it says why).
REFUSAL_TITLES = {
    "score_threshold": "最接近的段落（相关度低于阈值，未作为依据）",
    "key_term_coverage": "最接近的段落（没有写到问题的关键词，未作为依据）",
    "missing_name": "最接近的段落（没有提到问题里的名称，未作为依据）",
    "": "最接近的段落（未作为依据）",
}


def _friendly(fn: Callable) -> Callable:
    """Wrap a handler: log the traceback, show the person a gr.Error sentence instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(friendly_error(e), title="操作未完成", print_exception=False) from None

    return wrapper


class Handlers:
    """The page's event handlers; each one makes a single call into the context's services."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._stops: dict[str, threading.Event] = {}

    # --- common --------------------------------------------------------------------------------
    def _kb_choices(self, selected: str | None = None) -> dict:
        choices = library.choices(self.ctx.settings)  # (label, name): a damaged KB is labelled 已损坏
        names = [n for _, n in choices]
        value = selected if selected in names else (names[0] if names else None)
        return gr.update(choices=choices, value=value)

    @_friendly
    def load(self, selected: str | None) -> tuple[dict, str]:
        update = self._kb_choices(selected)
        return update, self.ctx.status_line(update["value"])

    @_friendly
    def status(self, kb: str | None) -> str:
        return self.ctx.status_line(kb)

    # --- chat ----------------------------------------------------------------------------------
    def ask(self, question: str, kb: str | None, chat: list, turns: list, answer_sources: list, top_k: float,
            threshold: float, temperature: float, max_tokens: float, history_turns: float,
            request: gr.Request) -> Iterator[tuple]:
        """Stream one answer into the chat, then its sources. Yields (question box, chat, turns, per-answer sources,
        sources panel)."""
        question = (question or "").strip()
        if not question:
            raise gr.Error("请输入问题。", title="问题为空")
        if not kb:
            raise gr.Error("还没有知识库：请先在「知识库管理」中新建知识库并上传文件。", title="没有知识库")
        stop = self._stops[request.session_hash or ""] = threading.Event()
        chat = [*chat, {"role": "user", "content": render.escape_user(question)},
                {"role": "assistant", "content": "…"}]
        # Every answer on the page owns one entry of answer_sources from its first yield on (clicking the n-th
        # answer shows entry n), so an answer that never reaches its last yield cannot shift the others' sources.
        number = len(answer_sources) + 1
        pending = render.hits_html([], question, title=f"答案来源（第 {number} 轮，回答未完成）")
        answer_sources = [*answer_sources, pending]
        yield "", chat, turns, answer_sources, gr.update()
        text, hits, refused, error, verdict, stream = "", [], False, "", None, None
        try:
            params = AnswerParams(top_k=int(top_k), threshold=float(threshold), temperature=float(temperature),
                                  max_new_tokens=int(max_tokens), history_turns=int(history_turns))
            stream = self.ctx.answer(question, kb, turns[-int(history_turns):] if history_turns else [], params,
                                     stop=stop)
            if not stream.refused:
                # retrieval is done: show the passages now, each with its sentence closest to the question
                streaming = render.hits_html(stream.sources, question, closest=stream.question_evidence,
                                             title=f"答案来源（第 {number} 轮，回答生成中）", state="streaming")
                yield "", chat, turns, answer_sources, streaming
            for piece in stream:
                text += piece
                chat[-1] = {"role": "assistant", "content": render.answer_markdown(text)}
                yield "", chat, turns, answer_sources, gr.update()
            hits, refused, error = stream.sources, stream.refused, stream.error or ""
            low = getattr(stream, "low_relevance", None) or []
            verdict = getattr(stream, "grounding", None)
        except Exception as e:
            log.exception("answer failed for %r in %r", question, kb)
            error, low = friendly_error(e), []
        if refused and not text:
            text = render.REFUSAL
        stopped = stop.is_set() and not refused and not error
        refusal = getattr(stream, "refusal", None) if stream is not None and not error else None
        chat[-1] = {"role": "assistant",
                    "content": render.answer_markdown(text, refused=refused, error=error, stopped=stopped,
                                                      grounding=verdict, refusal=refusal,
                                                      citations=getattr(stream, "citation_report", None))}
        closest = render.closest_for(stream) if stream is not None and not error else None
        reason = refusal.reason if refusal is not None else ""
        if refused:
            panel = render.hits_html(low or hits, question, title=REFUSAL_TITLES.get(reason, REFUSAL_TITLES[""]),
                                     note=refusal.message if refusal is not None else "", weak=True,
                                     closest=closest, reason=reason)
        elif reason == "model":
            panel = render.hits_html(hits, question, closest=closest, reason=reason,
                                     title=f"提供给模型的段落（第 {number} 轮，模型判断其中没有答案）")
        else:
            stopped_note = "，已停止生成" if stopped else ""
            panel = render.hits_html(hits, text or question, grounding=verdict, closest=closest, reason=reason,
                                     title=f"答案来源（第 {number} 轮{stopped_note}）")
        if text and not error and not stopped and not (verdict is not None and not verdict.ok):
            # a cut-off or ungrounded answer is not sent back to the model as history
            turns = [*turns, (question, text)]
        answer_sources = [*answer_sources[:-1], panel]
        yield "", chat, turns, answer_sources, panel

    def stop(self, request: gr.Request) -> None:
        """停止: the running answer's generation ends at its next token and `ask` finishes normally (sources, history,
        slot). Deliberately no Gradio `cancels=`: cancelling a streaming event races with its last yield and can
        leave the outputs in Gradio's error state (gradio-app/gradio#10648). A question still waiting in the queue
        is not withdrawn; it can be stopped once it starts."""
        event = self._stops.get(request.session_hash or "")
        if event is not None:
            event.set()

    @staticmethod
    def clear() -> tuple[list, list, list, str]:
        return [], [], [], ""

    @staticmethod
    def show_sources(answer_sources: list, evt: gr.SelectData) -> str:
        """Clicking an answer shows that answer's sources (the panel shows the latest one otherwise)."""
        answer_no = evt.index // 2 if isinstance(evt.index, int) else None
        if answer_no is not None and 0 <= answer_no < len(answer_sources):
            return answer_sources[answer_no]
        return gr.update()

    # --- knowledge bases -----------------------------------------------------------------------
    @_friendly
    def create_kb(self, name: str) -> tuple[dict, str, str]:
        created = library.create(name or "", self.ctx.settings)
        gr.Info(f"已新建知识库「{created}」，现在可以上传文件。")
        return self._kb_choices(created), "", self.ctx.status_line(created)

    @staticmethod
    def ask_delete_kb(kb: str | None) -> tuple[dict, str]:
        if not kb:
            raise gr.Error("请先选择要删除的知识库。", title="没有选择知识库")
        return (gr.update(visible=True),
                f"确定删除知识库「{render.escape_user(kb)}」吗？它的索引和上传的文件都会被删除，不能恢复。")

    @_friendly
    def delete_kb(self, kb: str | None) -> tuple[dict, dict, str]:
        library.delete(kb or "", self.ctx.settings)
        gr.Info(f"已删除知识库「{kb}」。")
        choices = self._kb_choices(None)
        return choices, gr.update(visible=False), self.ctx.status_line(choices["value"])

    @_friendly
    def files(self, kb: str | None) -> tuple[list[list], dict]:
        if not kb:
            return [], gr.update(choices=[], value=[])
        choices = gr.update(choices=library.file_paths(kb, self.ctx.settings), value=[])
        return library.file_table(kb, self.ctx.settings), choices

    @_friendly
    def upload(self, kb: str | None, files: list[str] | None) -> tuple[str, str, dict, None]:
        if not kb:
            raise gr.Error("请先选择或新建一个知识库，再上传文件。", title="没有选择知识库")
        paths = [Path(f) for f in files or []]
        # Gradio keeps each upload in its own folder under GRADIO_TEMP_DIR: the job deletes it once stored
        upload_root = Path(os.environ.get("GRADIO_TEMP_DIR", "/nonexistent")).resolve()
        cleanup = {p.parent for p in paths if p.parent.resolve().is_relative_to(upload_root)
                   and p.parent.resolve() != upload_root}
        job = self.ctx.jobs.upload(kb, [(p, p.name) for p in paths], cleanup=sorted(cleanup) or None)
        return job.id, render.job_html(job), gr.update(active=True), None

    @_friendly
    def reingest(self, kb: str | None, paths: list[str]) -> tuple[str, str, dict]:
        job = self.ctx.jobs.reingest(kb or "", paths or [])
        return job.id, render.job_html(job), gr.update(active=True)

    @_friendly
    def rebuild(self, kb: str | None) -> tuple[str, str, dict]:
        job = self.ctx.jobs.rebuild(kb or "")
        return job.id, render.job_html(job), gr.update(active=True)

    @_friendly
    def remove(self, kb: str | None, paths: list[str]) -> tuple[str, str, dict]:
        job = self.ctx.jobs.remove(kb or "", paths or [])
        return job.id, render.job_html(job), gr.update(active=True)

    @_friendly
    def poll(self, job_id: str, kb: str | None) -> tuple:
        """Timer tick while a job runs: progress; when it ends, stop the timer and refresh table and status."""
        if not job_id:
            return gr.update(), gr.update(active=False), gr.update(), gr.update(), gr.update()
        job = self.ctx.jobs.get(job_id)
        if job.active:
            return render.job_html(job), gr.update(), gr.update(), gr.update(), gr.update()
        table, choices = self.files(kb)
        return render.job_html(job), gr.update(active=False), table, choices, self.ctx.status_line(kb)

    # --- retrieval test ------------------------------------------------------------------------
    @_friendly
    def search(self, question: str, kb: str | None, top_k: float, threshold: float) -> str:
        question = (question or "").strip()
        if not question or not kb:
            raise gr.Error("请选择知识库并输入要检索的问题。", title="缺少输入")
        result = self.ctx.search(question, kb, AnswerParams(top_k=int(top_k), threshold=float(threshold)))
        note = ("有证据：得分最高的段落超过相关度阈值。" if result.evidence
                else "没有段落超过相关度阈值：问答会拒绝回答，下面是最接近的段落。")
        shown = result.hits or result.low_relevance
        try:
            closest = self.ctx.service.highlighter.closest(question, [h.text for h in shown])
        except Exception:  # noqa: BLE001 - the highlight is a convenience; the results still show
            log.exception("question highlight failed")
            closest = None
        return render.hits_html(shown, question, title=f"检索结果（{len(shown)} 条）",
                                note=note, weak=not result.evidence, closest=closest)


def theme() -> gr.themes.Base:
    # System fonts only: a named GoogleFont would make every browser fetch fonts.googleapis.com (no network here).
    return gr.themes.Base(primary_hue="blue", font=FONTS, font_mono=MONO_FONTS)


def build_page(ctx: AppContext) -> gr.Blocks:
    s = ctx.settings
    h = Handlers(ctx)
    with gr.Blocks(title="知问 · 离线文档问答", analytics_enabled=False) as page:
        gr.Markdown("## 知问 · 离线文档问答")
        with gr.Row(equal_height=True):
            kb = gr.Dropdown(label="知识库", choices=[], value=None, scale=1, elem_id="kb-select",
                             allow_custom_value=False)
            status = gr.Markdown(elem_classes=["zw-status"], elem_id="status-line")

        with gr.Tabs():
            with gr.Tab("问答", id="chat"):
                turns = gr.State([])            # (question, answer) pairs sent back to the model as history
                answer_sources = gr.State([])   # the sources panel of every answer, by answer number
                with gr.Row():
                    with gr.Column(scale=3):
                        chat = gr.Chatbot(label="对话", height=460, elem_id="chat", sanitize_html=True,
                                          buttons=["copy"], feedback_options=None,
                                          placeholder="选择知识库后输入问题，例如「如何上传文件？」")
                        question = gr.Textbox(label="问题", placeholder="输入问题，按回车发送", elem_id="question",
                                              lines=1)
                        with gr.Row():
                            send = gr.Button("发送", variant="primary", elem_id="send")
                            stop = gr.Button("停止", variant="stop", elem_id="stop")
                            clear = gr.Button("清空对话", elem_id="clear")
                        with gr.Accordion("参数", open=False):
                            top_k = gr.Slider(1, 20, value=s.retrieval.top_k, step=1, label="返回段落数 top-k")
                            threshold = gr.Slider(0, 1, value=s.retrieval.score_threshold, step=0.01,
                                                  label="相关度阈值")
                            temperature = gr.Slider(0, 1.5, value=s.llm.temperature, step=0.05,
                                                    label="温度 temperature")
                            max_tokens = gr.Slider(16, 2048, value=s.llm.max_new_tokens, step=16,
                                                   label="最大生成长度（token）")
                            history_turns = gr.Slider(0, 10, value=s.prompt.history_turns, step=1, label="历史轮数")
                    with gr.Column(scale=2):
                        sources = gr.HTML(label="答案来源", elem_id="sources",
                                          value='<div class="zw-note">回答后这里显示答案来源；'
                                                '点击对话中的某个回答可查看它的来源。</div>')

            with gr.Tab("知识库管理", id="kbs"):
                job_id = gr.State("")
                timer = gr.Timer(1.0, active=False)
                with gr.Row():
                    new_name = gr.Textbox(label="新知识库名称", placeholder="例如：公司制度", scale=3, elem_id="new-kb")
                    create = gr.Button("新建", scale=1, elem_id="create-kb")
                    delete_kb = gr.Button("删除知识库", variant="stop", scale=1, elem_id="delete-kb")
                with gr.Row(visible=False) as confirm_row:
                    confirm_text = gr.Markdown()
                    confirm = gr.Button("确认删除", variant="stop", elem_id="confirm-delete-kb")
                    cancel = gr.Button("取消")
                upload_files = gr.File(label="上传文件（可多选，也可上传 zip 压缩包）", file_count="multiple",
                                       type="filepath", file_types=ctx.upload_types(), elem_id="upload")
                start = gr.Button("开始导入", variant="primary", elem_id="start-ingest")
                job_view = gr.HTML(render.job_html(None), elem_id="job")
                table = gr.Dataframe(headers=library.FILE_TABLE_HEADERS, value=[], interactive=False,
                                     label="文件列表", elem_id="file-table", wrap=True)
                selected = gr.Dropdown(label="选择文件", multiselect=True, choices=[], elem_id="file-select")
                with gr.Row():
                    remove = gr.Button("删除所选文件", variant="stop", elem_id="remove-files")
                    reingest = gr.Button("重新导入所选文件", elem_id="reingest")
                    rebuild = gr.Button("重建知识库", elem_id="rebuild")

            with gr.Tab("检索测试", id="search"):
                search_q = gr.Textbox(label="问题", placeholder="只检索、不调用大模型", elem_id="search-question")
                with gr.Row():
                    search_k = gr.Slider(1, 20, value=s.retrieval.top_k, step=1, label="返回段落数 top-k")
                    search_thr = gr.Slider(0, 1, value=s.retrieval.score_threshold, step=0.01, label="相关度阈值")
                search_btn = gr.Button("检索", variant="primary", elem_id="search-btn")
                search_out = gr.HTML(elem_id="search-results")

        # --- wiring ----------------------------------------------------------------------------
        page.load(h.load, inputs=[kb], outputs=[kb, status], queue=False)
        kb.change(h.status, inputs=[kb], outputs=[status], queue=False).then(
            h.files, inputs=[kb], outputs=[table, selected], queue=False)

        ask = gr.on([send.click, question.submit], h.ask,
                    inputs=[question, kb, chat, turns, answer_sources, top_k, threshold, temperature, max_tokens,
                            history_turns],
                    outputs=[question, chat, turns, answer_sources, sources],
                    concurrency_limit=s.app.concurrency_limit, concurrency_id="generate", show_progress="minimal")
        ask.then(h.status, inputs=[kb], outputs=[status], queue=False)  # the first answer loads the model
        stop.click(h.stop, queue=False)
        clear.click(h.clear, outputs=[chat, turns, answer_sources, sources], queue=False)
        chat.select(h.show_sources, inputs=[answer_sources], outputs=[sources], queue=False)

        create.click(h.create_kb, inputs=[new_name], outputs=[kb, new_name, status])
        delete_kb.click(h.ask_delete_kb, inputs=[kb], outputs=[confirm_row, confirm_text], queue=False)
        cancel.click(lambda: gr.update(visible=False), outputs=[confirm_row], queue=False)
        confirm.click(h.delete_kb, inputs=[kb], outputs=[kb, confirm_row, status])

        start.click(h.upload, inputs=[kb, upload_files], outputs=[job_id, job_view, timer, upload_files])
        remove.click(h.remove, inputs=[kb, selected], outputs=[job_id, job_view, timer])
        reingest.click(h.reingest, inputs=[kb, selected], outputs=[job_id, job_view, timer])
        rebuild.click(h.rebuild, inputs=[kb], outputs=[job_id, job_view, timer])
        timer.tick(h.poll, inputs=[job_id, kb], outputs=[job_view, timer, table, selected, status],
                   queue=False, show_progress="hidden")

        gr.on([search_btn.click, search_q.submit], h.search, inputs=[search_q, kb, search_k, search_thr],
              outputs=[search_out])
    return page
