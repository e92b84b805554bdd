"""Knowledge bases in Milvus (`store.backend: milvus`), through pymilvus's MilvusClient.

    store.uri: knowledge_base/milvus.db      Milvus Lite, embedded in this process (one process per file)
    store.uri: http://milvus.intra:19530     a Milvus standalone or cluster server (token / user+password, TLS)

One collection per knowledge base (`zw_<hash of the name>`) holds the chunks: primary key, content sha256, position,
the embedded text (heading path + text) with Milvus's jieba analyzer, page and metadata (JSON), the dense vector
(FLAT/AUTOINDEX, cosine) and the BM25 sparse vector that Milvus computes itself from the text. Dense, BM25 and hybrid
search (the engine's RRF or weighted ranker) run inside Milvus; the retriever above keeps the evidence threshold,
neighbour merging and de-duplication, so answers follow the same rules as with FAISS files.

The manifest (the same `Manifest` JSON as the FAISS store: files, statuses, spec) lives in one shared collection,
`zhiwen_meta`, as numbered parts of generation n plus a head row per KB naming the live generation. Milvus has no
transactions; a commit is made atomic for readers the way the FAISS store does it, with the head row as CURRENT:

  1. head.pending = the contents about to be written        (a crash from here on leaves them for the next writer)
  2. upsert the new contents' chunks                         (content-addressed: pk = hash(sha256, position))
  3. write manifest parts of generation n+1, then the head   (the switch: one row upsert)
  4. delete the chunks no live file refers to any more; head.garbage lists them until they are gone
  5. Milvus Lite only (a file or milvus-lite's server): flush, so the rows leave Lite's in-memory table for indexed
     segments (_flush_lite)

Readers only ever use chunks whose content is live in the manifest they read, so rows written by a commit that has
not switched yet, or left by one killed half-way, are never shown, and a deleted file is gone at the next question
(readers reload when the head moves: `is_stale()`). Renames and duplicates are manifest changes only: the rows do not
name a file, the manifest does. Writers are serialised by the same lock file as the FAISS store
(<kb_root>/<name>/.lock, next to sources/); Milvus Lite itself refuses a second process on its file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.files import now_iso
from retrieval.store import (
    LIVE_STATUSES,
    SOURCES_DIR,
    STORED_STATUSES,
    FileEntry,
    IndexSpec,
    KBCorruptError,
    KBError,
    KBLockedError,
    KBNotFoundError,
    Manifest,
    _writer_lock,
    kb_dir,
)
from retrieval.stores import EngineCandidates
from retrieval.types import Chunk

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from configs import Settings

META_COLLECTION = "zhiwen_meta"
_PART_CHARS = 16_000          # manifest JSON characters per meta row (≤ 64 kB in UTF-8, Milvus's VARCHAR limit)
_BATCH = 512                  # rows per insert / ids per get
_FIELDS = ["pk", "sha", "position", "btext", "page", "extra"]
# Milvus's jieba analyzer in search mode (long words and their sub-words, like retrieval/bm25.py) + lower-casing.
ANALYZER = {"tokenizer": {"type": "jieba", "mode": "search"}, "filter": ["lowercase"]}
SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:")   # store.uri of a server; anything else is a Lite file
_INSTALL_HINT = "pip install pymilvus milvus-lite (requirements.txt pins them)"


class MilvusStoreError(KBError):
    """Milvus cannot be reached or used as configured; the message says what to change."""


# ---------------------------------------------------------------------------------------------------- connection
_clients: dict[tuple, MilvusClient] = {}
_clients_lock = threading.Lock()


def resolve_uri(settings: Settings) -> str:
    """store.uri as MilvusClient wants it: a server URL as given, a Milvus Lite file as an absolute path."""
    uri = settings.store.uri.strip()
    if uri.startswith(SERVER_SCHEMES):
        return uri
    path = settings.kb_root / "milvus.db" if not uri else settings.resolve(uri)
    if path.suffix != ".db":
        raise MilvusStoreError(
            f"store.uri {uri!r}: a Milvus Lite file must end in .db (e.g. knowledge_base/milvus.db), or give a server "
            "URL such as http://milvus-host:19530"
        )
    return str(path)


def is_lite(settings: Settings) -> bool:
    """store.uri is a Milvus Lite file, run inside this process."""
    return not resolve_uri(settings).startswith(SERVER_SCHEMES)


_lite_servers: dict[str, bool] = {}


def engine_is_lite(settings: Settings) -> bool:
    """The engine behind store.uri is Milvus Lite: a `*.db` file, or milvus-lite's own gRPC server
    (`python -m milvus_lite server`, which reports its version as "milvus_lite-…"). Both need the flush after a
    commit and FLAT for `store.index_type: auto`; a Milvus standalone/cluster needs neither."""
    if is_lite(settings):
        return True
    uri = resolve_uri(settings)
    if uri not in _lite_servers:
        with _engine_errors(settings, "读取服务器版本"):
            version = str(client(settings).get_server_version())
        _lite_servers[uri] = version.startswith("milvus_lite")
    return _lite_servers[uri]


def client(settings: Settings) -> MilvusClient:
    """The process's MilvusClient for store.uri (one per URI and credentials, shared by threads)."""
    s = settings.store
    uri = resolve_uri(settings)
    key = (uri, s.token, s.user, s.password, s.db_name, s.server_pem_path, s.server_name)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = _connect(settings, uri)
        return c


def close_clients() -> None:
    """Close every client this process opened (tests, benchmarks). Milvus Lite's in-process server of each file is
    stopped too (pymilvus leaves it running until the process exits), so the file is free for another process and
    nothing writes into its folder afterwards."""
    with _clients_lock:
        lite = [key[0] for key in _clients if not key[0].startswith(SERVER_SCHEMES)]
        for c in _clients.values():
            try:
                c.close()
            except Exception:  # closing is best effort: the process may be shutting the connection down anyway
                pass
        _clients.clear()
        _flushed_at_open.clear()
        _lite_servers.clear()
    if lite:
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:
            return
        for uri in lite:
            server_manager_instance.release_server(uri)


def _connect(settings: Settings, uri: str) -> MilvusClient:
    try:
        from pymilvus import MilvusClient
    except ImportError as e:
        raise MilvusStoreError(f"store.backend is milvus but pymilvus is not installed: {_INSTALL_HINT}") from e
    s = settings.store
    kwargs: dict[str, Any] = {"timeout": s.timeout_s}
    for k in ("token", "user", "password", "db_name", "server_pem_path", "server_name"):
        if getattr(s, k):
            kwargs[k] = getattr(s, k)
    if s.server_pem_path:
        kwargs["secure"] = True
    lite = not uri.startswith(SERVER_SCHEMES)
    if lite:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, **kwargs)
    except Exception as e:  # pymilvus raises its own exception types for every way a connection fails
        if lite and _lite_locked(uri):
            raise KBLockedError(
                f"Milvus Lite 数据文件 {uri} 正被另一个进程使用（Milvus Lite 一个文件只允许一个进程打开）。"
                "应用运行时请通过网页上传或 API 导入文件，或先停止应用再运行 ingest.py；"
                "需要多个进程同时读写时请改用 Milvus 服务器（store.uri: http://主机:19530，见 docs/deploy.md）。"
            ) from None
        where = f"Milvus Lite file {uri}" if lite else f"the Milvus server at {uri}"
        raise MilvusStoreError(f"cannot open {where} (store.uri): {e}. "
                               + ("" if lite else "Check that it runs and that store.token / user / password / TLS "
                                  "settings match it.")) from e


@contextmanager
def _engine_errors(settings: Settings, doing: str) -> Iterator[None]:
    """pymilvus errors (server down, timeout, refused credentials) as a MilvusStoreError naming store.uri."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as e:
        raise MilvusStoreError(
            f"Milvus（store.uri = {settings.store.uri or resolve_uri(settings)}）{doing}失败：{e.message}。"
            "请检查 Milvus 是否在运行、地址与凭据是否正确（docs/deploy.md）。"
        ) from e


def _lite_locked(uri: str) -> bool:
    """True when another process holds Milvus Lite's lock on the data folder."""
    lock = Path(uri) / "LOCK"
    if not lock.exists():
        return False
    import fcntl

    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def collection_name(kb_name: str) -> str:
    """Milvus names allow [A-Za-z0-9_] only; KB names may be Chinese, so the collection is named by a hash."""
    return "zw_" + hashlib.sha256(kb_name.encode("utf-8")).hexdigest()[:24]


def chunk_pk(sha256: str, position: int) -> int:
    """The chunk's primary key: content-addressed, so a renamed or duplicated file reuses its rows."""
    digest = hashlib.blake2b(f"{sha256}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------- schemas
def _ensure_meta(c: MilvusClient) -> None:
    if c.has_collection(META_COLLECTION):
        c.load_collection(META_COLLECTION)
        return
    from pymilvus import DataType

    s = c.create_schema(auto_id=False)
    s.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=512)
    s.add_field("kb", DataType.VARCHAR, max_length=256)
    s.add_field("kind", DataType.VARCHAR, max_length=16)      # head | part
    s.add_field("gen", DataType.INT64)
    s.add_field("part", DataType.INT64)
    s.add_field("body", DataType.VARCHAR, max_length=65535)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=2)            # Milvus requires a vector field; unused
    ip = c.prepare_index_params()
    ip.add_index("v", index_type="FLAT", metric_type="L2")
    c.create_collection(META_COLLECTION, schema=s, index_params=ip, consistency_level="Strong")
    c.load_collection(META_COLLECTION)


def _create_chunks_collection(c: MilvusClient, name: str, dim: int, index_type: str) -> None:
    from pymilvus import DataType, Function, FunctionType

    s = c.create_schema(auto_id=False)
    s.add_field("pk", DataType.INT64, is_primary=True)
    s.add_field("sha", DataType.VARCHAR, max_length=64)
    s.add_field("position", DataType.INT64)
    s.add_field("btext", DataType.VARCHAR, max_length=65535, enable_analyzer=True, analyzer_params=ANALYZER)
    s.add_field("page", DataType.INT64)                       # -1: no page
    s.add_field("extra", DataType.JSON)                       # heading_path, metadata
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    s.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["btext"],
                            output_field_names=["sparse"]))
    ip = c.prepare_index_params()
    ip.add_index("vector", index_type=index_type, metric_type="COSINE")
    ip.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    c.create_collection(name, schema=s, index_params=ip, consistency_level="Strong")
    c.load_collection(name)


def _index_type(settings: Settings) -> str:
    t = settings.store.index_type
    if t == "auto":
        return "FLAT" if engine_is_lite(settings) else "AUTOINDEX"
    return t.upper()


def _flush_lite(c: MilvusClient, settings: Settings, *collections: str) -> None:
    """Milvus Lite keeps new rows in an in-memory table until 128 MB of them accumulate, and every search scans that
    table row by row in Python, rebuilding a BM25 index over it per question (10k fresh chunks: ~2 s per hybrid
    search; docs/benchmarks.md §4c). A flush moves the rows into Parquet segments whose dense and BM25 indexes are
    built once and cached, so a commit flushes what it wrote — also through milvus-lite's own server. A Milvus
    server seals and indexes segments itself (and rate-limits flush), so this is for Lite only."""
    if not engine_is_lite(settings):
        return
    for name in collections:
        if c.has_collection(name):
            c.flush(name)


_flushed_at_open: set[tuple[str, str]] = set()


def _head_pk(name: str) -> str:
    return f"head/{name}"


def _read_head(c: MilvusClient, name: str) -> dict[str, Any] | None:
    rows = c.get(META_COLLECTION, ids=[_head_pk(name)], output_fields=["body"])
    if not rows:
        return None
    try:
        return json.loads(rows[0]["body"])
    except ValueError as e:
        raise KBCorruptError(f"知识库「{name}」在 Milvus 中的头记录已损坏（{e}）；请用 --rebuild 重建。") from e


def _write_head(c: MilvusClient, name: str, head: dict[str, Any]) -> None:
    c.upsert(META_COLLECTION, [{"pk": _head_pk(name), "kb": name, "kind": "head", "gen": int(head["generation"]),
                                "part": 0, "body": json.dumps(head, ensure_ascii=False), "v": [0.0, 0.0]}])


def _read_manifest(c: MilvusClient, name: str, head: Mapping[str, Any]) -> Manifest:
    gen, parts = int(head["generation"]), int(head.get("parts", 0))
    if parts == 0:
        return Manifest(gen, None, {})
    ids = [f"part/{name}/{gen}/{i}" for i in range(parts)]
    rows = {r["pk"]: r["body"] for r in c.get(META_COLLECTION, ids=ids, output_fields=["body"])}
    if len(rows) != parts:
        raise KBCorruptError(
            f"知识库「{name}」第 {gen} 代的清单在 Milvus 中不完整（{len(rows)}/{parts} 段）；请用 --rebuild 重建。"
        )
    try:
        return Manifest.from_json(json.loads("".join(rows[i] for i in ids)))
    except (KeyError, TypeError, ValueError) as e:
        raise KBCorruptError(f"知识库「{name}」第 {gen} 代的清单已损坏（{e}）；请用 --rebuild 重建。") from e


def _write_manifest(c: MilvusClient, name: str, manifest: Manifest) -> int:
    text = json.dumps(manifest.to_json(), ensure_ascii=False)
    pieces = [text[i:i + _PART_CHARS] for i in range(0, len(text), _PART_CHARS)] or [""]
    rows = [{"pk": f"part/{name}/{manifest.generation}/{i}", "kb": name, "kind": "part", "gen": manifest.generation,
             "part": i, "body": p, "v": [0.0, 0.0]} for i, p in enumerate(pieces)]
    for i in range(0, len(rows), 64):
        c.upsert(META_COLLECTION, rows[i:i + 64])
    return len(rows)


def _write_list(c: MilvusClient, name: str, kind: str, items: list[str]) -> int:
    """A long list of sha256 (a commit's pending contents or garbage) as meta rows `<kind>/<name>/<i>`; returns the
    number of rows (the head row keeps only that count: one VARCHAR holds 64 kB, a first ingest lists thousands)."""
    text = json.dumps(items)
    pieces = [text[i:i + _PART_CHARS] for i in range(0, len(text), _PART_CHARS)] if items else []
    rows = [{"pk": f"{kind}/{name}/{i}", "kb": name, "kind": kind, "gen": 0, "part": i, "body": p, "v": [0.0, 0.0]}
            for i, p in enumerate(pieces)]
    for i in range(0, len(rows), 64):
        c.upsert(META_COLLECTION, rows[i:i + 64])
    return len(rows)


def _read_list(c: MilvusClient, name: str, kind: str, parts: int) -> list[str]:
    if not parts:
        return []
    ids = [f"{kind}/{name}/{i}" for i in range(parts)]
    rows = {r["pk"]: r["body"] for r in c.get(META_COLLECTION, ids=ids, output_fields=["body"])}
    try:
        return list(json.loads("".join(rows[i] for i in ids)))
    except (KeyError, ValueError):
        return []  # an interrupted write of the list itself: nothing of it was written to the chunks yet


def _quote(values: list[str]) -> str:
    return json.dumps(values, ensure_ascii=False)  # sha256 hex and KB names ([A-Za-z0-9_-] and CJK): nothing to escape


# ---------------------------------------------------------------------------------------------------- KB level
def list_knowledge_bases(settings: Settings) -> list[str]:
    c = client(settings)
    with _engine_errors(settings, "列出知识库"):
        _ensure_meta(c)
        rows = c.query(META_COLLECTION, filter='kind == "head"', output_fields=["kb"])
    return sorted(r["kb"] for r in rows)


def delete_knowledge_base(name: str, settings: Settings, *, timeout: float | None = 0) -> None:
    path = kb_dir(name, settings)
    c = client(settings)
    with _engine_errors(settings, f"删除知识库「{name}」"):
        _ensure_meta(c)
        if _read_head(c, name) is None:
            raise KBNotFoundError(f"知识库「{name}」不存在（Milvus {resolve_uri(settings)}）。")
    with _writer_lock(path, name, timeout), _engine_errors(settings, f"删除知识库「{name}」"):
        c.delete(META_COLLECTION, ids=[_head_pk(name)])  # readers see "not found" from here on
        c.delete(META_COLLECTION, filter=f'kb == {_quote([name])[1:-1]}')
        if c.has_collection(collection_name(name)):
            c.drop_collection(collection_name(name))
        trash = path.with_name(f".tmp-deleted-{name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def read_manifest(name: str, settings: Settings) -> tuple[str, Manifest]:
    """(generation, manifest) from the head row and the manifest parts only (the KB list, status line, file table)."""
    kb_dir(name, settings)
    c = client(settings)
    with _engine_errors(settings, f"读取知识库「{name}」的清单"):
        _ensure_meta(c)
        for _ in range(10):
            head = _read_head(c, name)
            if head is None:
                raise KBNotFoundError(f"知识库「{name}」不存在（Milvus {resolve_uri(settings)}）。")
            try:
                return f"gen-{int(head['generation'])}", _read_manifest(c, name, head)
            except KBCorruptError:
                again = _read_head(c, name)
                if again is None or again.get("generation") == head.get("generation"):
                    raise
    raise KBCorruptError(f"知识库「{name}」一直在被改写，无法读到一个稳定的版本；请稍后再试。")


class MilvusKnowledgeBase:
    """One committed generation of a KB in Milvus: its manifest in memory, its chunks searched in the engine."""

    index = None  # no FAISS index: the retriever searches through `candidates()`

    def __init__(self, name: str, settings: Settings, head: Mapping[str, Any], manifest: Manifest) -> None:
        self.name = name
        self.path = kb_dir(name, settings)
        self.generation = f"gen-{int(head['generation'])}"
        self.manifest = manifest
        self._settings = settings
        self._client = client(settings)
        self._collection = collection_name(name)
        self._by_sha: dict[str, list[str]] | None = None

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, name: str, settings: Settings) -> MilvusKnowledgeBase:
        kb_dir(name, settings)  # validates the name
        with _engine_errors(settings, f"打开知识库「{name}」"):
            return cls._open(name, settings)

    @classmethod
    def _open(cls, name: str, settings: Settings) -> MilvusKnowledgeBase:
        c = client(settings)
        _ensure_meta(c)
        for _ in range(10):  # a writer may switch generations between reading the head and the parts
            head = _read_head(c, name)
            if head is None:
                raise KBNotFoundError(
                    f"知识库「{name}」不存在（Milvus {resolve_uri(settings)}）。"
                    f"先用 python ingest.py <文件夹> --kb {name} 建库。"
                )
            try:
                manifest = _read_manifest(c, name, head)
            except KBCorruptError:
                again = _read_head(c, name)
                if again is not None and again.get("generation") != head.get("generation"):
                    continue
                raise
            if c.has_collection(collection_name(name)):
                c.load_collection(collection_name(name))
                key = (resolve_uri(settings), collection_name(name))
                if key not in _flushed_at_open:  # rows a killed writer left in Lite's log come back unindexed
                    _flush_lite(c, settings, collection_name(name))
                    _flushed_at_open.add(key)
            return cls(name, settings, head, manifest)
        raise KBCorruptError(f"知识库「{name}」一直在被改写，无法读到一个稳定的版本；请稍后再试。")

    @classmethod
    def create(cls, name: str, settings: Settings, *, exist_ok: bool = True) -> MilvusKnowledgeBase:
        path = kb_dir(name, settings)
        c = client(settings)
        with _engine_errors(settings, f"创建知识库「{name}」"):
            _ensure_meta(c)
            exists = _read_head(c, name) is not None
        if exists:
            if not exist_ok:
                raise KBError(f"知识库「{name}」已存在（Milvus {resolve_uri(settings)}）。")
            return cls.open(name, settings)
        (path / SOURCES_DIR).mkdir(parents=True, exist_ok=True)
        with _writer_lock(path, name, timeout=0), _engine_errors(settings, f"创建知识库「{name}」"):
            if _read_head(c, name) is None:
                MilvusKBWriter(name, settings).commit(force=True)
        return cls.open(name, settings)

    @classmethod
    def open_or_create(cls, name: str, settings: Settings) -> MilvusKnowledgeBase:
        try:
            return cls.open(name, settings)
        except KBNotFoundError:
            return cls.create(name, settings)

    @staticmethod
    @contextmanager
    def open_writer(name: str, settings: Settings, *, timeout: float | None = 0) -> Iterator[MilvusKBWriter]:
        path = kb_dir(name, settings)
        (path / SOURCES_DIR).mkdir(parents=True, exist_ok=True)
        with _writer_lock(path, name, timeout):
            w = MilvusKBWriter(name, settings)
            if w.live_generation is None:
                w.commit(force=True)
            yield w

    @contextmanager
    def writer(self, *, timeout: float | None = 0) -> Iterator[MilvusKBWriter]:
        with _writer_lock(self.path, self.name, timeout):
            yield MilvusKBWriter(self.name, self._settings)

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def sources_dir(self) -> Path:
        return self.path / SOURCES_DIR

    def is_stale(self) -> bool:
        with _engine_errors(self._settings, f"读取知识库「{self.name}」的版本"):
            head = _read_head(self._client, self.name)
        return head is None or f"gen-{int(head['generation'])}" != self.generation

    def reopen(self) -> MilvusKnowledgeBase:
        return MilvusKnowledgeBase.open(self.name, self._settings)

    @cached_property
    def _live(self) -> dict[str, int]:
        """Live content sha256 -> its chunk count (only these contents' rows are ever shown)."""
        return {e.sha256: len(e.chunk_ids) for e in self.manifest.files.values() if e.status == "ok"}

    def sources_for(self, sha256: str) -> list[str]:
        if self._by_sha is None:
            by: dict[str, list[str]] = {}
            for e in sorted(self.manifest.files.values(), key=lambda e: (e.status != "ok", e.path)):
                if e.status in LIVE_STATUSES:
                    by.setdefault(e.sha256, []).append(e.path)
            self._by_sha = by
        return list(self._by_sha.get(sha256, ()))

    def __len__(self) -> int:
        return sum(self._live.values())

    def __repr__(self) -> str:
        files = len(self.manifest.files)
        return f"MilvusKnowledgeBase({self.name!r}, {self.generation}, {len(self)} chunks, {files} files)"

    def _has_rows(self) -> bool:
        return bool(self._live) and self._client.has_collection(self._collection)

    def _chunk(self, row: Mapping[str, Any]) -> Chunk:
        extra = row.get("extra") or {}
        heading = tuple(extra.get("heading_path") or ())
        btext = row["btext"]
        prefix = " > ".join(heading)
        text = btext[len(prefix) + 1:] if prefix and btext.startswith(prefix + "\n") else btext
        owners = self.sources_for(row["sha"])
        page = int(row["page"])
        return Chunk(text=text, source=owners[0] if owners else "", sha256=row["sha"], position=int(row["position"]),
                     page=None if page < 0 else page, heading_path=heading, id=int(row["pk"]),
                     metadata=dict(extra.get("metadata") or {}))

    def _get(self, pks: list[int], vectors: bool) -> list[dict[str, Any]]:
        fields = _FIELDS + (["vector"] if vectors else [])
        out: list[dict[str, Any]] = []
        for i in range(0, len(pks), _BATCH):
            out.extend(self._client.get(self._collection, ids=pks[i:i + _BATCH], output_fields=fields))
        return [r for r in out if self._live.get(r["sha"], -1) > int(r["position"])]

    def chunks_for(self, sha256: str) -> list[Chunk]:
        """The chunks of one live content in file order."""
        n = self._live.get(sha256, 0)
        if not n or not self._has_rows():
            return []
        rows = self._get([chunk_pk(sha256, p) for p in range(n)], vectors=False)
        return sorted((self._chunk(r) for r in rows), key=lambda c: c.position)

    @property
    def chunks(self) -> list[Chunk]:
        """Every live chunk, content by content in file order (reads the whole collection: for tests and tools;
        the retriever never needs it)."""
        return [c for sha in self._live for c in self.chunks_for(sha)]

    # -- engine search -------------------------------------------------------------------------------------
    def candidates(self, query: np.ndarray | None, question: str, *, mode: str, fetch_k: int, fusion: str,
                   rrf_k: int, dense_weight: float) -> EngineCandidates:
        """Dense / BM25 / hybrid search in Milvus, then the candidates' neighbours (position ± 1), as a local view."""
        with _engine_errors(self._settings, f"检索知识库「{self.name}」"):
            return self._candidates(query, question, mode=mode, fetch_k=fetch_k, fusion=fusion, rrf_k=rrf_k,
                                    dense_weight=dense_weight)

    def _candidates(self, query: np.ndarray | None, question: str, *, mode: str, fetch_k: int, fusion: str,
                    rrf_k: int, dense_weight: float) -> EngineCandidates:
        if not self._has_rows():
            return EngineCandidates([], np.zeros((0, self.manifest.dim or 1), np.float32), [], [])
        from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

        c, coll, fields = self._client, self._collection, _FIELDS + ["vector"]
        limit = min(fetch_k + 16, 16384)  # a few spare: rows of contents a commit has not switched to are dropped
        dense_req = {"data": [np.asarray(query, np.float32).tolist()], "anns_field": "vector", "limit": limit,
                     "param": {"metric_type": "COSINE"}} if query is not None else None
        bm25_req = {"data": [question], "anns_field": "sparse", "limit": limit, "param": {"metric_type": "BM25"}}
        dense_res: list[dict] = []
        bm25_res: list[dict] = []
        fused_res: list[dict] | None = None
        if mode == "hybrid" and dense_req is not None and fusion in ("rrf", "weighted"):
            # the engine's own ranker; "adaptive" has none in Milvus: both lists come back and are fused above
            ranker = RRFRanker(rrf_k) if fusion == "rrf" else WeightedRanker(dense_weight, 1 - dense_weight)
            fused_res = c.hybrid_search(coll, [AnnSearchRequest(**dense_req), AnnSearchRequest(**bm25_req)],
                                        ranker=ranker, limit=limit, output_fields=fields)[0]
        else:
            if mode != "bm25" and dense_req is not None:
                dense_res = c.search(coll, data=dense_req["data"], anns_field="vector", limit=limit,
                                     search_params=dense_req["param"], output_fields=fields)[0]
            if mode != "dense":
                bm25_res = c.search(coll, data=[question], anns_field="sparse", limit=limit,
                                    search_params=bm25_req["param"], output_fields=fields)[0]

        rows: dict[int, dict[str, Any]] = {}

        def take(results: list[dict], score=float) -> list[tuple[int, float]]:
            out = []
            for r in results:
                ent = {**r["entity"], "pk": r.get("id", r["entity"].get("pk"))}
                if self._live.get(ent["sha"], -1) <= int(ent["position"]):
                    continue  # a content no live file refers to (deleted, or a commit not yet switched)
                rows.setdefault(int(ent["pk"]), ent)
                out.append((int(ent["pk"]), score(r["distance"])))
                if len(out) == fetch_k:
                    break
            return out

        dense_pk = take(dense_res)
        bm25_pk = take(bm25_res, score=lambda d: abs(float(d)))  # Milvus Lite reports BM25 as a negative distance
        fused_pk = take(fused_res) if fused_res is not None else None

        # Neighbours for merging: the chunks just before and after each candidate in its file.
        wanted = []
        for ent in list(rows.values()):
            for p in (int(ent["position"]) - 1, int(ent["position"]) + 1):
                pk = chunk_pk(ent["sha"], p)
                if 0 <= p < self._live.get(ent["sha"], 0) and pk not in rows:
                    wanted.append(pk)
        for ent in self._get(sorted(set(wanted)), vectors=True):
            rows.setdefault(int(ent["pk"]), ent)

        order = list(rows)
        row_of = {pk: i for i, pk in enumerate(order)}
        chunks = [self._chunk(rows[pk]) for pk in order]
        dim = self.manifest.dim or (len(query) if query is not None else 1)
        vectors = np.asarray([rows[pk]["vector"] for pk in order], dtype=np.float32).reshape(len(order), dim)
        to_rows = lambda pairs: [(row_of[pk], s) for pk, s in pairs]  # noqa: E731
        fused = dict(to_rows(fused_pk)) if fused_pk is not None else None
        dense = to_rows(dense_pk)
        if fused is not None and query is not None:  # the engine's hybrid result carries no separate cosine
            q = np.asarray(query, np.float32)
            dense = sorted(((r, float(vectors[r] @ q)) for r in fused), key=lambda x: -x[1])
        return EngineCandidates(chunks, vectors, dense, to_rows(bm25_pk), fused)


# ---------------------------------------------------------------------------------------------------- writer
class MilvusKBWriter:
    """The pending state of a Milvus KB under the writer lock; `commit()` applies it (see the module docstring).

    The same contract as retrieval.store.KBWriter: contents (sha256 -> chunks + vectors) and file entries; at commit
    the first live entry of a content owns it ("ok"), other live entries are duplicates, unreferenced contents go.
    """

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.path = kb_dir(name, settings)
        self._c = client(settings)
        with _engine_errors(settings, f"打开知识库「{name}」的写入"):
            self._read_state()

    def _read_state(self) -> None:
        name = self.name
        _ensure_meta(self._c)
        self._collection = collection_name(name)
        head = _read_head(self._c, name)
        self._head = head
        self._new: dict[str, tuple[list[Chunk], np.ndarray]] = {}
        self._stored: dict[str, int] = {}
        self._files: dict[str, FileEntry] = {}
        self._spec: IndexSpec | None = None
        self._created_at = now_iso()
        self._drop_all = False        # --rebuild with another vector size: the collection is made anew
        self._superseded: set[str] = set()  # contents stored before a --rebuild (deleted after the switch)
        self.dirty = False
        if head is not None:
            manifest = _read_manifest(self._c, name, head)
            self._spec, self._files, self._created_at = manifest.spec, dict(manifest.files), manifest.created_at
            for e in manifest.files.values():
                if e.status == "ok":
                    self._stored[e.sha256] = len(e.chunk_ids)
            self._collect_leftovers(head)

    def _collect_leftovers(self, head: dict[str, Any]) -> None:
        """Rows a killed writer left: contents it was writing that never became live, and garbage it had listed."""
        listed = (_read_list(self._c, self.name, "pending", int(head.get("pending", 0)))
                  + _read_list(self._c, self.name, "garbage", int(head.get("garbage", 0))))
        leftovers = [s for s in listed if s not in self._stored]
        if leftovers and self._c.has_collection(self._collection):
            self._delete_contents(leftovers)
        if head.get("pending") or head.get("garbage"):
            head = {**head, "pending": 0, "garbage": 0}
            _write_head(self._c, self.name, head)
            self._head = head

    # -- reading the pending state -------------------------------------------------------------------------
    @property
    def spec(self) -> IndexSpec | None:
        return self._spec

    @property
    def files(self) -> Mapping[str, FileEntry]:
        return self._files

    @property
    def live_generation(self) -> str | None:
        return None if self._head is None else f"gen-{int(self._head['generation'])}"

    def has_content(self, sha256: str) -> bool:
        return sha256 in self._new or sha256 in self._stored

    def chunk_count(self, sha256: str) -> int:
        if sha256 in self._new:
            return len(self._new[sha256][0])
        return self._stored.get(sha256, 0)

    def live_paths(self, sha256: str) -> list[str]:
        live = [e for e in self._files.values() if e.sha256 == sha256 and e.status in LIVE_STATUSES]
        return [e.path for e in sorted(live, key=lambda e: (e.status != "ok", e.ingested_at, e.path))]

    # -- changes -------------------------------------------------------------------------------------------
    def set_spec(self, spec: IndexSpec, *, rebuild: bool = False) -> None:
        if rebuild:
            self._superseded |= set(self._stored)
            self._drop_all = self._drop_all or (self._spec is not None and self._spec.dim != spec.dim)
            self._new.clear()
            self._files.clear()
            self._stored.clear()
        else:
            Manifest(0, self._spec, self._files).check_compatible(spec, self.name)
        if spec != self._spec or rebuild:
            self._spec = spec
            self.dirty = True

    def add_content(self, sha256: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(chunks) or not chunks:
            raise ValueError(f"add_content({sha256[:12]}): {len(chunks)} chunks but vectors of shape {vectors.shape}")
        if self._spec is not None and self._spec.dim and vectors.shape[1] != self._spec.dim:
            raise ValueError(f"add_content: vectors have dim {vectors.shape[1]}, the KB uses {self._spec.dim}")
        self._new[sha256] = (list(chunks), vectors)
        self.dirty = True

    def put(self, entry: FileEntry) -> None:
        if entry.status not in STORED_STATUSES:
            raise ValueError(f"FileEntry.status must be one of {sorted(STORED_STATUSES)}, got {entry.status!r}")
        if entry.status in LIVE_STATUSES and not self.has_content(entry.sha256):
            raise ValueError(f"{entry.path}: status {entry.status} but no chunks stored for sha256 {entry.sha256[:12]}")
        self._files[entry.path] = entry
        self.dirty = True

    def remove(self, path: str) -> FileEntry | None:
        e = self._files.pop(path, None)
        if e is not None:
            self.dirty = True
        return e

    # -- commit --------------------------------------------------------------------------------------------
    def commit(self, *, force: bool = False) -> str | None:
        """Apply the pending state as generation n+1 (see the module docstring for the order of writes)."""
        if not self.dirty and not force:
            return None
        with _engine_errors(self.settings, f"写入知识库「{self.name}」"):
            return self._commit()

    def _commit(self) -> str | None:
        c = self._c
        gen = 0 if self._head is None else int(self._head["generation"]) + 1
        owners: dict[str, str] = {}
        for e in sorted(self._files.values(), key=lambda e: (e.status != "ok", e.ingested_at, e.path)):
            if e.status in LIVE_STATUSES:
                owners.setdefault(e.sha256, e.path)
        counts = {sha: self.chunk_count(sha) for sha in owners}
        to_write = [sha for sha in self._new if sha in owners]
        dropped = [sha for sha in {**dict.fromkeys(self._superseded), **self._stored} if sha not in owners]
        shrunk = {sha: counts[sha] for sha in to_write if self._stored.get(sha, 0) > counts[sha]}

        base = dict(self._head or {"name": self.name, "collection": self._collection, "generation": -1, "parts": 0})
        if self._drop_all and c.has_collection(self._collection):
            # --rebuild with another embedding size: the old vectors cannot share the collection, so readers of the
            # old generation find no rows until the switch (the only moment a Milvus KB is briefly empty)
            c.drop_collection(self._collection)
            dropped = []
        if to_write:
            _write_head(c, self.name, {**base, "pending": _write_list(c, self.name, "pending", to_write)})
            if not c.has_collection(self._collection):
                dim = self._spec.dim if self._spec and self._spec.dim else self._new[to_write[0]][1].shape[1]
                _create_chunks_collection(c, self._collection, dim, _index_type(self.settings))
            for sha in to_write:
                self._write_content(sha, *self._new[sha])

        files: dict[str, FileEntry] = {}
        for path in sorted(self._files):
            e = self._files[path]
            if e.status in LIVE_STATUSES:
                owner = owners[e.sha256]
                e = replace(e, status="ok" if owner == path else "duplicate",
                            duplicate_of=None if owner == path else owner,
                            chunk_ids=tuple(chunk_pk(e.sha256, p) for p in range(counts[e.sha256])),
                            reason="" if owner == path else e.reason)
            else:
                e = replace(e, chunk_ids=(), duplicate_of=None)
            files[path] = e
        now = now_iso()
        manifest = Manifest(gen, self._spec, files, created_at=self._created_at or now, updated_at=now)
        parts = _write_manifest(c, self.name, manifest)
        garbage = dropped
        head = {**base, "generation": gen, "parts": parts, "pending": 0,
                "garbage": _write_list(c, self.name, "garbage", garbage)}
        _write_head(c, self.name, head)  # the switch: readers see generation `gen` from here on

        if (garbage or shrunk) and c.has_collection(self._collection):
            self._delete_contents(garbage)
            for sha, n in shrunk.items():
                c.delete(self._collection, filter=f'sha == "{sha}" and position >= {n}')
        if garbage:
            head = {**head, "garbage": 0}
            _write_head(c, self.name, head)
        c.delete(META_COLLECTION, filter=f'kb == {_quote([self.name])[1:-1]} and kind == "part" and gen < {gen - 1}')
        _flush_lite(c, self.settings, self._collection, META_COLLECTION)

        self._head, self._files, self._drop_all, self._superseded = head, files, False, set()
        self._stored = {sha: counts[sha] for sha in owners}
        self._new.clear()
        self.dirty = False
        return f"gen-{gen}"

    def _write_content(self, sha: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].position)
        rows = []
        for pos, i in enumerate(order):
            ch = chunks[i]
            rows.append({"pk": chunk_pk(sha, pos), "sha": sha, "position": pos, "btext": ch.embedding_text(),
                         "page": -1 if ch.page is None else int(ch.page),
                         "extra": {"heading_path": list(ch.heading_path), "metadata": ch.metadata},
                         "vector": vectors[i].tolist()})
        for i in range(0, len(rows), _BATCH):
            self._c.upsert(self._collection, rows[i:i + _BATCH])

    def _delete_contents(self, shas: list[str]) -> None:
        for i in range(0, len(shas), 256):
            self._c.delete(self._collection, filter=f"sha in {_quote(shas[i:i + 256])}")
