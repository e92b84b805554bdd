"""Text → L2-normalised float32 vectors with a local sentence-transformers folder (see docs/ARCHITECTURE.md).

    emb = Embedder.from_settings(settings)      # stores settings only: cheap, no model is read
    emb.count_tokens("passage text")            # loads just the tokenizer (the splitter needs it, not the model)
    vecs = emb.encode_passages(["…", "…"])      # loads the model on first use (or call emb.warm_up() up front)

The query and passage prefixes come from settings.embedding (e5: "query: " / "passage: "; bge-zh: an instruction
for queries, nothing for passages). Models are only ever read from disk: HF_HUB_OFFLINE=1 and local_files_only.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.embeddings import Embeddings

from common.cpu import has_native_bf16
from configs.settings import EmbeddingSettings, Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_PULL_HINT = "run `python -m modelpack pull demo` to install the model pack, or set embedding.model to a folder"


class EmbedderError(RuntimeError):
    """The embedding model cannot be used as configured; the message says what to change."""


class ModelMissingError(EmbedderError, FileNotFoundError):
    """The configured embedding model folder does not exist (or is not a model folder)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _transformer_dir(folder: Path) -> Path:
    """Where the tokenizer and the HF model of a sentence-transformers folder live (modules.json names it;
    usually the folder itself, "0_Transformer" in older saves). A plain Hugging Face folder is its own."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return folder
    for m in modules if isinstance(modules, list) else []:
        if str(m.get("type", "")).endswith("Transformer"):
            return folder / str(m.get("path", ""))
    return folder


def fingerprint(folder: Path) -> str:
    """A short id of a model folder's content: names and sizes of all its files, plus the bytes of its small
    config files. Cheap (no weights are read) and changes when the model is replaced or re-configured."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if p.suffix == ".json" and size < 256_000 and p.name != "tokenizer.json":
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


class Embedder(Embeddings):
    """A LangChain `Embeddings` over sentence-transformers, with the product's prefixes and limits.

    Thread-safe lazy loading: the first of several concurrent callers loads, the others wait.
    """

    def __init__(self, settings: EmbeddingSettings, folder: Path) -> None:
        self.settings = settings
        self.folder = Path(folder)
        self._lock = threading.RLock()  # re-entrant: loading the model loads the tokenizer
        self._model: SentenceTransformer | None = None
        self._tokenizer: Any = None
        self._max_tokens: int | None = None
        self._model_id: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        """Store the settings only; nothing is read until first use (or `warm_up()`)."""
        return cls(settings.embedding, settings.model_path(settings.embedding.model))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings and folder only (parser processes get `count_tokens` this way); each process loads
        what it uses itself."""
        return {"settings": self.settings, "folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"], state["folder"])

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        return f"Embedder({str(self.folder)!r}, device={self.settings.device!r}, {state})"

    # -- loading -----------------------------------------------------------------------------------------------
    def _check_folder(self) -> None:
        if not self.folder.is_dir():
            raise ModelMissingError(
                f"embedding model folder {self.folder} not found (embedding.model = {self.settings.model!r}): "
                f"{_PULL_HINT}"
            )
        if not ((self.folder / "modules.json").is_file() or (self.folder / "config.json").is_file()):
            raise ModelMissingError(
                f"{self.folder} is not a sentence-transformers or Hugging Face model folder (no modules.json or "
                f"config.json; embedding.model = {self.settings.model!r}): {_PULL_HINT}"
            )

    @property
    def device(self) -> str:
        """The device the model runs on: embedding.device, with "auto" resolved to cuda when a GPU is visible."""
        import torch

        want = self.settings.device
        if want == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise EmbedderError(
                "embedding.device is 'cuda' but no CUDA GPU is visible to PyTorch: set embedding.device to 'cpu' "
                "or 'auto' (ZHIWEN_EMBEDDING__DEVICE=auto)"
            )
        return want

    def warm_up(self) -> Embedder:
        """Load the model now (otherwise the first encode does). Returns self."""
        self._get_model()
        return self

    def _get_model(self) -> SentenceTransformer:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load_model()
        return self._model

    @property
    def precision(self) -> str:
        """The precision the model runs in: embedding.precision, with "auto" resolved for this machine —
        bf16 on a CPU with native bf16 matrix units (AVX512-BF16 / AMX), fp32 otherwise. On a GPU "auto" is fp32:
        a model this small is bound by tokenisation there, and fp16/bf16 measured no faster (docs/benchmarks.md)."""
        want = self.settings.precision
        if want != "auto":
            return want
        if self.device == "cuda":
            return "fp32"
        return "bf16" if has_native_bf16() else "fp32"

    def _load_model(self) -> SentenceTransformer:
        self._check_folder()
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub, whatever the folder's config names
        import torch
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(self.folder), device=self.device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EmbedderError(f"cannot load the embedding model in {self.folder}: {e}. {_PULL_HINT}") from e
        # Reduced precision: the weights are cast once; vectors come back as float32 and are re-normalised
        # (docs/benchmarks.md: speed and CMRC quality per precision, measured side by side).
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is torch.float16 and self.device != "cuda":
            raise EmbedderError("embedding.precision 'fp16' needs embedding.device 'cuda' (CPUs run fp16 slowly): "
                                "use 'bf16', 'fp32' or 'auto'")
        if dtype is not None:
            model.to(dtype)
        model.max_seq_length = self.max_tokens
        # The prefixes come from settings; a default prompt saved in the folder would be added a second time.
        model.default_prompt_name = None
        return model

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._check_folder()
                    os.environ["HF_HUB_OFFLINE"] = "1"
                    from transformers import AutoTokenizer

                    # Our own instance, never the model's: sentence-transformers turns truncation on in its
                    # tokenizer, and a truncating counter would report a too-long chunk as fitting.
                    self._tokenizer = AutoTokenizer.from_pretrained(
                        str(_transformer_dir(self.folder)), local_files_only=True
                    )
        return self._tokenizer

    # -- limits and identity -------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for `text` as a passage: passage prefix and special tokens included, no truncation."""
        ids = self._get_tokenizer()(
            self.settings.passage_prefix + text, add_special_tokens=True, truncation=False, verbose=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]
        return len(ids)

    @property
    def max_tokens(self) -> int:
        """min(embedding.max_seq_length, the model's own limit): the most tokens a passage may have."""
        if self._max_tokens is None:
            self._max_tokens = min(self.settings.max_seq_length, self._model_limit())
        return self._max_tokens

    def _model_limit(self) -> int:
        tdir = _transformer_dir(self.folder)
        limits: list[int] = []
        st_len = _read_json(tdir / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(st_len, int) and st_len > 0:
            limits.append(st_len)
        tok_len = getattr(self._get_tokenizer(), "model_max_length", None)
        if isinstance(tok_len, int) and 0 < tok_len < 1_000_000:  # "no limit" is stored as a huge number
            limits.append(tok_len)
        cfg = _read_json(tdir / "config.json")
        positions = cfg.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            # RoBERTa-family models (XLM-R, e5) reserve two positions for the padding offset.
            offset = 2 if cfg.get("model_type") in ("xlm-roberta", "roberta", "camembert") else 0
            limits.append(positions - offset)
        return min(limits) if limits else self.settings.max_seq_length

    @property
    def dim(self) -> int:
        dim = self._get_model().get_embedding_dimension()
        if not dim:
            raise EmbedderError(f"the model in {self.folder} does not report an embedding dimension")
        return int(dim)

    @property
    def model_id(self) -> str:
        """Folder name + fingerprint, e.g. "multilingual-e5-small-3f9a0c1b2d4e": stored in a knowledge base so that
        vectors from a different model are never mixed with this one's. The fingerprint covers the folder's content
        and the settings that change passage vectors (passage prefix, max_seq_length), not the query prefix."""
        if self._model_id is None:
            self._check_folder()
            vector_settings = f"{self.settings.passage_prefix}\0{self.settings.max_seq_length}"
            digest = hashlib.sha256(f"{fingerprint(self.folder)}\0{vector_settings}".encode()).hexdigest()[:12]
            self._model_id = f"{self.folder.name}-{digest}"
        return self._model_id

    # -- encoding ----------------------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> np.ndarray:
        model = self._get_model()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # sentence-transformers already sorts by length before batching (and restores the order), so the
        # texts go in as they are: sorting here too would only repeat that work.
        vecs = model.encode(
            texts, batch_size=self.settings.batch_size, normalize_embeddings=True, convert_to_tensor=True,
            show_progress_bar=False,
        )
        vecs = vecs.float().cpu().numpy()
        if self.precision != "fp32":  # normalised in reduced precision: make the norms exactly 1 again
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised, row i for texts[i]; the passage prefix is added here."""
        prefix = self.settings.passage_prefix
        return self._encode([prefix + t for t in texts])

    def encode_query(self, text: str) -> np.ndarray:
        """(dim,) float32, L2-normalised; the query prefix is added here."""
        return self._encode([self.settings.query_prefix + text])[0]

    # -- LangChain Embeddings ------------------------------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encode_passages(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encode_query(text).tolist()
