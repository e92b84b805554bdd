"""The web room without a browser: login, upload safety (names, zips), HTML escaping and highlights, API auth,
background jobs against the real ingest pipeline. Browser tests are in test_browser.py."""
from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from app import render
from app.auth import AuthConfigError, Authenticator, env_var_for, hash_password
from app.uploads import UploadLimits, safe_filename, store_uploads
from configs import PROJECT_ROOT, load_settings
from retrieval.types import Hit

LIMITS = UploadLimits(allowed_extensions=frozenset({".txt", ".md", ".pdf"}), max_file_bytes=1 << 20,
                      max_unzipped_bytes=4 << 20, max_zip_entries=20, max_zip_ratio=50)


def _settings(**app):
    return load_settings(app=app)


# --- auth ---------------------------------------------------------------------------------------------------------
def test_bcrypt_user_verifies_only_with_the_right_password():
    s = _settings(auth_enabled=True, users=[{"username": "alice", "password_hash": hash_password("开门 sesame")}])
    a = Authenticator(s, environ={})
    assert a.verify("alice", "开门 sesame")
    assert not a.verify("alice", "开门")
    assert not a.verify("bob", "开门 sesame")
    assert a.gradio_auth() is not None


def test_env_password_user_and_variable_name():
    assert env_var_for("li.ming-2") == "ZHIWEN_PASSWORD_LI_MING_2"
    s = _settings(auth_enabled=True, users=[{"username": "li.ming-2"}])
    a = Authenticator(s, environ={"ZHIWEN_PASSWORD_LI_MING_2": "pw1"})
    assert a.verify("li.ming-2", "pw1") and not a.verify("li.ming-2", "pw2")


def test_login_misconfiguration_names_the_fix():
    with pytest.raises(AuthConfigError, match="app.users is empty"):
        Authenticator(_settings(auth_enabled=True), environ={})
    with pytest.raises(AuthConfigError, match="ZHIWEN_PASSWORD_CAROL"):
        Authenticator(_settings(auth_enabled=True, users=[{"username": "carol"}]), environ={})
    with pytest.raises(AuthConfigError, match="not a bcrypt hash"):
        Authenticator(_settings(auth_enabled=True, users=[{"username": "d", "password_hash": "plain"}]), environ={})
    off = Authenticator(_settings(), environ={})
    assert off.gradio_auth() is None and off.verify("anyone", "")


def test_hash_command_prints_a_usable_hash():
    out = subprocess.run([sys.executable, "-m", "app.auth", "hash", "--stdin"], input="s3cret 密码\n",
                         capture_output=True, text=True, cwd=PROJECT_ROOT, check=True).stdout.strip()
    assert out.startswith("$2b$12$")
    a = Authenticator(_settings(auth_enabled=True, users=[{"username": "u", "password_hash": out}]), environ={})
    assert a.verify("u", "s3cret 密码") and not a.verify("u", "s3cret")


# --- upload names and zips ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, safe", [
    ("../../etc/passwd.txt", "passwd.txt"),
    ("C:\\Users\\x\\报告.pdf", "报告.pdf"),
    ("/abs/path/a.md", "a.md"),
    ("..", "file"),
    (".hidden.txt", "hidden.txt"),
    ("a<b>:c|d?.txt", "a_b__c_d_.txt"),
    ("CON.txt", "_CON.txt"),
    ("x\x00y.txt", "x_y.txt"),
])
def test_safe_filename(raw, safe):
    assert safe_filename(raw) == safe


def test_safe_filename_caps_length_and_keeps_extension():
    name = safe_filename("长" * 300 + ".pdf")
    assert name.endswith(".pdf") and len(name.encode()) <= 200


def _file(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / "upload-tmp" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_uploads_never_escape_or_overwrite(tmp_path):
    dest = tmp_path / "kb" / "sources"
    a = _file(tmp_path, "1", "第一份".encode())
    b = _file(tmp_path, "2", "第二份，内容不同".encode())
    c = _file(tmp_path, "3", "第一份".encode())
    out = store_uploads([(a, "../../evil.txt"), (b, "evil.txt"), (c, "evil.txt"), (a, "x.exe")], dest, LIMITS)
    names = [p.name for p in out.saved]
    assert names == ["evil.txt", "evil (2).txt"]        # same bytes reuse evil.txt, different bytes get a new name
    assert (dest / "evil.txt").read_text(encoding="utf-8") == "第一份"
    assert (dest / "evil (2).txt").read_text(encoding="utf-8") == "第二份，内容不同"
    assert [r.name for r in out.rejected] == ["x.exe"] and "不支持" in out.rejected[0].reason
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "kb" / "evil.txt").exists()


def test_upload_size_limit(tmp_path):
    big = _file(tmp_path, "big", b"x" * ((1 << 20) + 1))
    out = store_uploads([(big, "big.txt")], tmp_path / "s", LIMITS)
    assert out.saved == [] and "app.max_upload_mb" in out.rejected[0].reason


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], level: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=level) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def test_zip_entries_are_checked_one_by_one(tmp_path):
    link = zipfile.ZipInfo("link.txt")
    link.external_attr = (0o120777 << 16)  # a symlink entry
    data = _zip([
        ("docs/好.txt", "正常文件".encode()),
        ("../escape.txt", b"bad"),
        ("/etc/abs.txt", b"bad"),
        ("C:/win.txt", b"bad"),
        (link, b"/etc/passwd"),
        ("prog.exe", b"MZ"),
        ("bomb.txt", b"0" * (2 << 20)),   # compresses ~1000x: refused by the ratio cap
        ("sub/dir/note.md", "# 标题\n内容".encode()),
    ])
    z = _file(tmp_path, "up.zip", data)
    dest = tmp_path / "kb" / "sources"
    out = store_uploads([(z, "资料.zip")], dest, LIMITS)
    assert sorted(p.name for p in out.saved) == ["note.md", "好.txt"]
    reasons = {r.name.split("/", 1)[1]: r.reason for r in out.rejected}
    assert "「..」" in reasons["../escape.txt"]
    assert "绝对路径" in reasons["/etc/abs.txt"] and "绝对路径" in reasons["C:/win.txt"]
    assert "符号链接" in reasons["link.txt"]
    assert "不支持" in reasons["prog.exe"]
    assert "压缩炸弹" in reasons["bomb.txt"]
    on_disk = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == ["kb/sources/note.md", "kb/sources/好.txt", "upload-tmp/up.zip"]


def test_zip_total_and_entry_count_limits(tmp_path):
    many = _file(tmp_path, "many.zip", _zip([(f"{i}.txt", b"x") for i in range(21)]))
    out = store_uploads([(many, "many.zip")], tmp_path / "s", LIMITS)
    assert out.saved == [] and "app.max_zip_entries" in out.rejected[0].reason
    # 5 MB of varied text: the ratio is fine but the total is over max_unzipped_bytes
    varied = bytes(range(256)) * (5 * 4096)
    large = _file(tmp_path, "large.zip", _zip([("a.txt", varied)], level=zipfile.ZIP_STORED))
    out = store_uploads([(large, "large.zip")], tmp_path / "s", LIMITS)
    assert out.saved == [] and "app.max_unzipped_mb" in out.rejected[0].reason


def test_zip_with_gbk_names_from_windows(tmp_path):
    # Windows zip tools write GBK names without the UTF-8 flag; Python reads them as cp437.
    gbk_name = "制度.txt".encode("gbk")
    raw = _zip([("ABCD.txt", "考勤制度".encode())])  # an ASCII stand-in of the same byte length, then patched
    assert len(gbk_name) == len(b"ABCD.txt") and raw.count(b"ABCD.txt") == 2
    raw = raw.replace(b"ABCD.txt", gbk_name)
    out = store_uploads([(_file(tmp_path, "g.zip", raw), "g.zip")], tmp_path / "s", LIMITS)
    assert [p.name for p in out.saved] == ["制度.txt"]


def test_corrupt_zip_is_a_sentence(tmp_path):
    out = store_uploads([(_file(tmp_path, "c.zip", b"PK\x03\x04broken"), "c.zip")], tmp_path / "s", LIMITS)
    assert out.saved == [] and "不是有效的 zip" in out.rejected[0].reason


# --- rendering ------------------------------------------------------------------------------------------------
def _hit(text: str, source: str = "a.md") -> Hit:
    return Hit(text=text, score=0.9, source=source, chunk_ids=(1,), page=3, heading_path=("导入文件", "如何上传"),
               dense_score=0.88)


def test_document_text_cannot_inject_markup():
    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>正文。'
    out = render.hits_html([_hit(evil, source="<b>x</b>.md")], "正文", title="来源")
    assert "<script>" not in out and "<img" not in out and "<b>x</b>" not in out
    assert "&lt;script&gt;" in out and "&lt;b&gt;x&lt;/b&gt;.md" in out
    assert "<script>" not in render.answer_markdown("<script>x</script>")
    assert "<script>" not in render.escape_user("<script>x</script>")


def test_supporting_sentences_are_highlighted():
    passage = "知问支持多种格式。上传文件时，先选择知识库，再点击上传文件区域。导入在后台进行。"
    answer = "先选择知识库，然后点击「上传文件」区域。"
    out = render.highlighted_passage(passage, answer, top=1)
    assert "<mark>上传文件时，先选择知识库，再点击上传文件区域。</mark>" in out
    assert out.count("<mark>") == 1
    assert render.supporting_sentences("天气很好。", "完全无关") == set()
    # a list keeps its line breaks (the passage is shown as written, not as one run-on paragraph)
    listed = render.highlighted_passage("支持：\n- PDF；\n- Word；\n\n表格按行保存。", "表格按行保存", top=1)
    assert listed == "支持：<br>- PDF；<br>- Word；<br><br><mark>表格按行保存。</mark>"


def test_refusal_and_error_look_different_from_an_answer():
    assert 'class="zw-refusal"' in render.answer_markdown("", refused=True)
    assert render.REFUSAL in render.answer_markdown("", refused=True)
    assert 'class="zw-error"' in render.answer_markdown("部分", error="模型出错")
    assert "zw-" not in render.answer_markdown("普通答案")
    # the model's own refusal (it read the passages and found no answer) is styled as a refusal too, and says so
    own = render.answer_markdown("根据已知信息无法回答该问题。")
    assert "zw-refusal" in own and "zw-model-refusal" in own and "模型判断" in own
    assert "zw-refusal" in render.answer_markdown("没有提供 足够的相关信息")
    assert "zw-refusal" not in render.answer_markdown("根据已知信息，年假是十五天。")
    # an answer cut off with 停止 says so
    assert 'class="zw-stopped"' in render.answer_markdown("年假是", stopped=True)


def test_refusal_notes_say_which_rule_and_mark_the_closest_sentence():
    from app.refusals import Refusal, threshold_refusal

    low = threshold_refusal(0.8261, 0.86)
    bubble = render.answer_markdown("", refused=True, refusal=low)
    assert "zw-reason-score_threshold" in bubble and "0.826" in bubble and "0.86" in bubble
    assert "没有调用模型" in bubble and render.REFUSAL in bubble
    own = render.answer_markdown("根据已知信息无法回答该问题。",
                                 refusal=Refusal("model", "模型判断：提供给它的段落中没有答案。", {}))
    assert "zw-reason-model" in own and "zw-model-refusal" in own
    hits = [_hit("天气很好。上传文件请点击上传按钮。其他。"), _hit("第二段。第二段的第二句。")]
    panel = render.hits_html(hits, "怎么上传？", title="最接近的段落", weak=True, reason="score_threshold",
                             closest={1: "上传文件请点击上传按钮。", 2: "第二段的第二句。"})
    assert 'data-reason="score_threshold"' in panel and 'data-state="done"' in panel and "zw-legend" in panel
    assert panel.count('<mark class="zw-q" title=') == 2 and '上传文件请点击上传按钮。</mark>' in panel
    assert render.hit_spans(hits, "", closest={1: "上传文件请点击上传按钮。"}) == [[[5, 17]], []]
    # once a checked answer exists, its content decides (the page passes closest sentences only when
    # render.closest_for finds nothing to go by)
    from grounding import check_answer

    verdict = check_answer("点击上传按钮。", "怎么上传？", [h.text for h in hits])
    answered = render.hits_html(hits, "点击上传按钮。", title="答案来源", grounding=verdict)
    assert "zw-q" not in answered and "<mark>上传文件请点击上传按钮。</mark>" in answered

    class Done:      # a finished stream's fields, as render.closest_for reads them
        refused, refusal, question_evidence = False, None, {1: "上传文件请点击上传按钮。"}

        def __init__(self, text):
            self.text = text
    assert render.closest_for(Done("[1] [2]")) == {1: "上传文件请点击上传按钮。"}   # markers only: nothing to go by
    assert render.closest_for(Done("点击上传按钮[1]。")) is None


def test_citation_compliance_is_marked_subtly():
    from grounding.compliance import citation_report

    text = "年假十五天[1]。申请要提前三天。加班另算[7]。"
    report = citation_report(text, passages=2)
    out = render.answer_markdown(text, citations=report)
    assert '<span class="zw-uncited" title="这句话没有标注出处">申请要提前三天。</span>' in out
    assert 'class="zw-cite" data-passage="1"' in out and 'class="zw-cite-bad"' in out and 'data-passage="7"' not in out
    assert "1 句没有标注出处" in out and "引用 [7] 不存在" in out
    clean = "年假十五天[1]。申请要提前三天[2]。"
    assert "zw-uncited" not in render.answer_markdown(clean, citations=citation_report(clean, passages=2))
    assert "zw-cite-note" not in render.answer_markdown(clean, citations=citation_report(clean, passages=2))
    assert "zw-uncited" not in render.answer_markdown(text)       # the default template: nothing changes


def test_hit_card_shows_file_page_heading_and_score():
    out = render.hits_html([_hit("内容。")], "内容", title="答案来源")
    assert "a.md" in out and "第 3 页" in out and "导入文件 &gt; 如何上传" in out and "0.900" in out


# --- API login ------------------------------------------------------------------------------------------------
def test_api_requires_login_when_enabled(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from app.server import create_app

    monkeypatch.setenv("ZHIWEN_PATHS__KB_ROOT", str(tmp_path))
    monkeypatch.setenv("ZHIWEN_PASSWORD_ALICE", "pw-alice")
    s = load_settings(app={"auth_enabled": True, "users": [{"username": "alice"}]})
    with TestClient(create_app(s)) as client:
        assert client.get("/api/kbs").status_code == 401
        assert client.get("/api/kbs", auth=("alice", "wrong")).status_code == 401
        r = client.get("/api/kbs", auth=("alice", "pw-alice"))
        assert r.status_code == 200 and r.json() == []
        # the page itself is behind Gradio's login form
        assert client.get("/config").status_code == 401


# --- background jobs against the real pipeline --------------------------------------------------------------------
def test_upload_job_ingests_reports_and_removes(tmp_settings, tmp_path, models_dir):
    from app import library
    from app.jobs import JobManager
    from tests.conftest import require_model

    require_model(models_dir, tmp_settings.embedding.model)
    library.create("手册", tmp_settings)
    guide = PROJECT_ROOT / "docs" / "guide" / "02-导入文件.md"
    z = _file(tmp_path, "z.zip", _zip([("faq.md", (PROJECT_ROOT / "docs/guide/06-常见问题.md").read_bytes()),
                                       ("../x.md", b"bad")]))
    jobs = JobManager(tmp_settings)
    try:
        job = jobs.upload("手册", [(guide, guide.name), (z, "包.zip"), (guide, "bad.exe")])
        assert job.state == "queued"
        done = jobs.wait(job.id, timeout=300)
        assert done.state == "done", done.error
        rows = {f.name: f for f in done.files}
        assert rows["sources/02-导入文件.md"].status == "ok" and rows["sources/02-导入文件.md"].chunks > 0
        assert rows["sources/faq.md"].status == "ok"
        assert rows["包.zip/../x.md"].status == "rejected" and rows["bad.exe"].status == "rejected"
        assert library.size("手册", tmp_settings).files == 2
        table = library.file_table("手册", tmp_settings)
        assert [r[0] for r in table] == ["sources/02-导入文件.md", "sources/faq.md"] and table[0][3] == "已导入"

        # re-ingest re-parses the selected file even though it is unchanged (force=True): a retry after a fix
        again = jobs.wait(jobs.reingest("手册", ["sources/faq.md", "sources/nope.md"]).id, timeout=120)
        assert [(f.name, f.status) for f in again.files] == [("sources/faq.md", "ok"), ("sources/nope.md", "rejected")]
        rebuilt = jobs.wait(jobs.rebuild("手册").id, timeout=300)
        assert rebuilt.state == "done", rebuilt.error
        assert sorted((f.name, f.status) for f in rebuilt.files) == [("sources/02-导入文件.md", "ok"),
                                                                      ("sources/faq.md", "ok")]
        assert library.size("手册", tmp_settings).files == 2

        gone = jobs.wait(jobs.remove("手册", ["sources/faq.md"]).id, timeout=120)
        assert [(f.name, f.status) for f in gone.files] == [("sources/faq.md", "removed")]
        assert library.file_paths("手册", tmp_settings) == ["sources/02-导入文件.md"]
        kb_sources = tmp_settings.kb_root / "手册" / "sources"
        assert sorted(p.name for p in kb_sources.iterdir()) == ["02-导入文件.md"]

        failed = jobs.wait(jobs.upload("不存在", [(guide, guide.name)]).id, timeout=60)
        assert failed.state == "failed" and "不存在" in failed.error
    finally:
        jobs.shutdown()


def test_rebuild_when_the_first_folder_is_gone(tmp_settings, tmp_path, models_dir):
    """Issue 12 bug: the rebuild passed rebuild=(i == 0) but skipped missing folders, so with the first folder gone
    nothing was rebuilt (the second folder's files came back 'unchanged'). Now the first folder that exists starts
    the fresh generation, and the gone folder's files are reported as removed, never silently kept or lost."""
    from app import library
    from app.jobs import JobManager
    from ingest import ingest
    from retrieval.embeddings import Embedder
    from tests.conftest import require_model

    require_model(models_dir, tmp_settings.embedding.model)
    embedder = Embedder.from_settings(tmp_settings)
    first, second = tmp_path / "a-first", tmp_path / "b-second"
    for folder, text in ((first, "甲文件夹：报销需要发票原件。"), (second, "乙文件夹：年假为十五天，需提前申请。")):
        folder.mkdir()
        (folder / "doc.txt").write_text(text, encoding="utf-8")
        assert ingest(folder, "两处", tmp_settings, embedder=embedder).exit_code == 0
    assert library.file_paths("两处", tmp_settings) == ["a-first/doc.txt", "b-second/doc.txt"]
    (first / "doc.txt").unlink()
    first.rmdir()
    jobs = JobManager(tmp_settings, embedder=lambda: embedder)
    try:
        done = jobs.wait(jobs.rebuild("两处").id, timeout=300)
        assert done.state == "done", done.error
        rows = {f.name: f for f in done.files}
        assert rows["b-second/doc.txt"].status == "ok"          # re-parsed and re-embedded: a real rebuild
        assert rows["a-first/doc.txt"].status == "removed" and "已不存在" in rows["a-first/doc.txt"].reason
        assert library.file_paths("两处", tmp_settings) == ["b-second/doc.txt"]
        # every folder gone: the job fails with a sentence and the knowledge base is left as it was
        (second / "doc.txt").unlink()
        second.rmdir()
        failed = jobs.wait(jobs.rebuild("两处").id, timeout=60)
        assert failed.state == "failed" and "都已不存在" in failed.error
        assert library.file_paths("两处", tmp_settings) == ["b-second/doc.txt"]
    finally:
        jobs.shutdown()


# --- the concurrency bench, small ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_chats_and_ingest_small(tmp_path, models_dir):
    """bench/concurrency.py at a small scale: 3 simultaneous chats + 1 upload through the HTTP API of a real app."""
    from bench.concurrency import Client, run_bench, start_local_app
    from tests.conftest import require_model

    require_model(models_dir, "qwen2.5-coder-0.5b-instruct")
    proc, origin = start_local_app(tmp_path, "使用指南", {
        "ZHIWEN_PROFILE": "test", "ZHIWEN_LLM__DTYPE": "float32", "ZHIWEN_INGEST__WORKERS": "1"})
    try:
        result = run_bench(Client(origin), "使用指南", chats=3,
                           params={"max_new_tokens": 8, "top_k": 1, "temperature": 0})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # What this small run can prove is concurrency: no errors, every chat streamed and was grounded in the file that
    # holds its answer, and the ingest finished. Whether the tiny 0.5B model with 8 new tokens then answers or
    # refuses is answer quality, measured by `python -m bench.concurrency` with the demo model (a refusal counts as
    # wrong there).
    from bench.concurrency import QUESTIONS

    assert [c.error for c in result.chats] == ["", "", ""]
    for chat, (question, _ref, source) in zip(result.chats, QUESTIONS, strict=False):
        assert chat.question == question and chat.pieces >= 1, (chat.question, chat.answer)
        assert chat.sources and chat.sources[0].endswith("/" + source), (chat.question, chat.sources)
    assert result.ingest_job["state"] == "done", result.ingest_job
    assert [(f["name"], f["status"]) for f in result.ingest_job["files"]] == [("sources/星河公司年假制度.md", "ok")]


def test_basic_credentials_are_utf8():
    from base64 import b64encode

    from app.api import basic_credentials

    assert basic_credentials("Basic " + b64encode("alice:开门:1".encode()).decode()) == ("alice", "开门:1")
    assert basic_credentials("Bearer abc") is None
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials("Basic " + b64encode(b"no-colon").decode()) is None
