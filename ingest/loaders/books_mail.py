"""E-books (.epub, ebooklib) and e-mail (.eml, the standard library's email package)."""
from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import warnings
import zipfile

from ingest.encoding import decode_bytes
from ingest.loaders.base import Ctx, LoadError, heading
from ingest.loaders.markup import decode_markup, html_to_docs


def load_epub(ctx: Ctx) -> None:
    """Chapters in spine (reading) order, each as HTML through the same walker as web pages."""
    import ebooklib
    from ebooklib import epub

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            book = epub.read_epub(str(ctx.path), options={"ignore_ncx": True})
    except (zipfile.BadZipFile, KeyError, epub.EpubException, ValueError) as e:
        raise LoadError("corrupt", f"电子书「{ctx.name}」无法打开（{e}）：文件可能已损坏或有 DRM 保护，请提供无保护的 "
                                   "EPUB") from e
    items = {item.get_id(): item for item in book.get_items_of_type(ebooklib.ITEM_DOCUMENT)}
    order = [idref for idref, _linear in book.spine if idref in items]
    order += [i for i in items if i not in order]
    for idref in order:
        data = items[idref].get_content()
        html_to_docs(ctx, decode_markup(data, is_html=True).text)


def load_eml(ctx: Ctx) -> None:
    """Subject as a heading, then From/To/Cc/Date, then the plain-text body (or the HTML one, as text).

    Attachments are listed by name, not parsed: import them as files of their own.
    """
    data = ctx.path.read_bytes()
    msg = email.message_from_bytes(data, policy=email.policy.default)
    raw = email.message_from_bytes(data, policy=email.policy.compat32)  # headers as written, for _header
    lines = []
    subject = _header(raw, "subject")
    if subject:
        lines.append(heading(1, subject))
    for key, label in (("from", "发件人"), ("to", "收件人"), ("cc", "抄送"), ("date", "日期")):
        value = _header(raw, key)
        if value:
            lines.append(f"{label}: {value}")
    plain = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    attachments = [part.get_filename() for part in msg.iter_attachments() if part.get_filename()]
    if plain is not None:
        lines.append(_part_text(plain))
        ctx.add_text("\n".join(lines))
    elif html is not None:
        ctx.add_text("\n".join(lines))
        html_to_docs(ctx, _part_text(html))
    else:
        ctx.add_text("\n".join(lines))
    if attachments:
        ctx.add_text("附件: " + "、".join(attachments))


def _header(raw: email.message.Message, key: str) -> str:
    """A header's text. Encoded words are decoded by us: the standard library decodes "=?gb2312?...?=" with
    the strict GB2312 codec and garbles GBK-only characters (镕, 堃) that real mail clients put there."""
    value = raw.get(key)
    if value is None:
        return ""
    parts = []
    for chunk, charset in email.header.decode_header(str(value)):
        if isinstance(chunk, bytes):
            chunk = decode_bytes(chunk, charset).text if charset else decode_bytes(chunk).text
        parts.append(chunk)
    return " ".join("".join(parts).split())


def _part_text(part: email.message.EmailMessage) -> str:
    """A MIME part's text; a missing or wrong charset falls back to our own detection (never Latin-1)."""
    payload = part.get_payload(decode=True) or b""
    return decode_bytes(payload, part.get_content_charset()).text
