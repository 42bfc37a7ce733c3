"""`storygpt data download tinystories`: the real TinyStories files from the Hugging Face Hub, laid
out so that `storygpt data prepare` takes them directly.

The files come from the dataset repository `roneneldan/TinyStories` through huggingface_hub, which
caches them under HF_HOME (a second run downloads nothing), shows progress, resumes a transfer whose
connection drops (with an HTTP Range request from the last byte received), and honours HF_ENDPOINT (a
mirror) and HF_HUB_OFFLINE (cache only). Each file is then checked against the size and sha256 the
Hub lists for it, and placed in OUT, hard-linked from the cache where the file system allows it (so
the 2 GB are not stored twice); the JSON archive is extracted there instead.

    OUT/train/TinyStories-train.txt        --version v1 (default): the original release (GPT-3.5 and GPT-4 stories)
    OUT/validation/TinyStories-valid.txt
    OUT/train/TinyStoriesV2-GPT4-train.txt --version v2: GPT-4 stories only
    OUT/validation/TinyStoriesV2-GPT4-valid.txt
    OUT/all/data00.json ... data49.json    --version json: TinyStories_all_data.tar.gz extracted (what llama2.c uses)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir

REPO = "roneneldan/TinyStories"

# version -> split -> files of the dataset repository
VERSIONS: dict[str, dict[str, list[str]]] = {
    "v1": {"train": ["TinyStories-train.txt"], "validation": ["TinyStories-valid.txt"]},
    "v2": {"train": ["TinyStoriesV2-GPT4-train.txt"], "validation": ["TinyStoriesV2-GPT4-valid.txt"]},
    "json": {"all": ["TinyStories_all_data.tar.gz"]},  # one archive; `data prepare` makes the val split
}
SPLITS = ("train", "validation", "all")


def files_for(version: str, split: str) -> dict[str, list[str]]:
    """The repository files of a version's split ("all": every split), by the folder they go to."""
    if version not in VERSIONS:
        raise StoryGPTError(f"unknown TinyStories version {version!r}; choose from {', '.join(VERSIONS)}")
    splits = VERSIONS[version]
    if split == "all":
        return dict(splits)
    if split not in splits:
        raise StoryGPTError(f"TinyStories {version} has no {split!r} split (it has: {', '.join(splits)})")
    return {split: splits[split]}


def download_tinystories(out: str | os.PathLike, version: str = "v1", split: str = "all",
                         revision: str = "main", progress: bool = True) -> dict[str, list[Path]]:
    """Download (or take from the cache), verify and lay out TinyStories in OUT; returns {folder: [files]}."""
    from huggingface_hub import constants

    wanted = files_for(version, split)
    names = [f for files in wanted.values() for f in files]
    # None: offline, or the Hub is out of reach and the cache has every file
    listing = None if constants.HF_HUB_OFFLINE else _listing(revision, names)
    out = Path(out)
    placed: dict[str, list[Path]] = {}
    with _progress_bars(progress):
        for folder, files in wanted.items():
            for name in files:
                local = _fetch(name, revision, offline=listing is None)
                if listing is not None:
                    _verify(local, listing[name])
                if name.endswith(".tar.gz"):
                    placed.setdefault(folder, []).extend(extract_archive(local, out / folder, progress))
                else:
                    placed.setdefault(folder, []).append(place(local, out / folder / name))
    return placed


def _listing(revision: str, names: list[str]) -> dict | None:
    """The Hub's size and checksum of each wanted file at `revision`; None when the Hub cannot be
    reached but every file is in the cache already (and was checked when it was downloaded).

    (A file that changed between this listing and its download fails the check: run again.)"""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().dataset_info(REPO, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 -- transport errors are requests/httpx/httpx2 types, by hub version
        cached = all(isinstance(try_to_load_from_cache(REPO, n, revision=revision, repo_type="dataset"), str)
                     for n in names)
        if cached and not isinstance(e, HfHubHTTPError):
            endpoint = os.environ.get("HF_ENDPOINT") or "the Hub"
            print(f"storygpt: warning: cannot reach {endpoint} ({type(e).__name__}); using the cached files",
                  file=sys.stderr)
            return None
        raise _hub_error(e, REPO) from None
    listing = {s.rfilename: s for s in info.siblings or []}
    missing = [n for n in names if n not in listing]
    if missing:
        raise StoryGPTError(f"{REPO}@{info.sha[:12]} has no file {missing[0]}; the dataset's layout changed?")
    return listing


def _fetch(name: str, revision: str, offline: bool) -> Path:
    """The file from the cache, downloading it first when needed (huggingface_hub resumes, retries, caches)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(REPO, name, repo_type="dataset", revision=revision, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 -- see _listing
        raise _hub_error(e, name) from None


def _hub_error(e: Exception, what: str) -> StoryGPTError:
    """One clear line for what went wrong talking to the Hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE:
            return StoryGPTError(f"HF_HUB_OFFLINE is set and {what} is not in the cache ({constants.HF_HUB_CACHE}); "
                                 "unset it to download")
        return StoryGPTError(f"cannot reach {endpoint} and {what} is not in the cache; check the connection "
                             "(or set HF_ENDPOINT to a mirror)")
    if isinstance(e, RepositoryNotFoundError):
        return StoryGPTError(f"{endpoint} has no dataset {REPO} (or it is private)")
    if isinstance(e, RevisionNotFoundError):
        return StoryGPTError(f"{REPO} has no such revision ({what})")
    if isinstance(e, EntryNotFoundError):
        return StoryGPTError(f"{REPO} has no file {what}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "an error"
        return StoryGPTError(f"{endpoint} answered HTTP {status} for {what}")
    if isinstance(e, OSError) and not isinstance(e, ConnectionError):  # disk full, permissions, ...
        return StoryGPTError(f"{what}: {e.strerror or e}")
    reason = str(e).splitlines()[0] if str(e) else ""
    return StoryGPTError(f"cannot reach {endpoint} ({type(e).__name__}: {reason}); check the connection, set "
                         "HF_ENDPOINT to a mirror, or HF_HUB_OFFLINE=1 to use files already downloaded")


def _verify(path: Path, entry) -> None:
    """The file's size, and its sha256 (LFS files: all of TinyStories) or git blob id, against the Hub's listing."""
    size = path.stat().st_size
    expected_size = entry.lfs.size if entry.lfs is not None else entry.size
    if expected_size is not None and size != expected_size:
        raise StoryGPTError(f"{entry.rfilename}: {size:,} bytes downloaded, the Hub lists {expected_size:,}; "
                            "delete it from the cache and retry")
    if entry.lfs is not None:
        digest, expected = _hash(path, hashlib.sha256()), entry.lfs.sha256
    elif entry.blob_id:
        digest, expected = _hash(path, hashlib.sha1(f"blob {size}\0".encode())), entry.blob_id
    else:
        return
    if digest != expected:
        raise StoryGPTError(f"{entry.rfilename}: checksum mismatch (got {digest[:12]}, the Hub lists {expected[:12]}); "
                            "delete it from the cache and retry")


def _hash(path: Path, h) -> str:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def place(src: Path, dst: Path) -> Path:
    """Put the cached file at `dst`: a hard link to the cache's copy where possible, else a copy; atomic."""
    src = src.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or none that links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def extract_archive(archive: Path, dest: Path, progress: bool = True) -> list[Path]:
    """Extract a .tar.gz of data files into `dest` (replacing it), refusing anything but plain files and
    folders inside it: no absolute paths, no '..', no links or devices. Skipped when `dest` already holds
    this archive's contents."""
    from storygpt.progress import tqdm_bar

    marker = dest / ".extracted-from"
    stamp = f"{archive.resolve().name} {archive.stat().st_size}"
    if marker.is_file() and marker.read_text() == stamp:
        return sorted(p for p in dest.rglob("*") if p.is_file() and p != marker)
    with atomic_dir(dest) as work:
        with tarfile.open(archive, "r:*") as tar:
            members = list(_safe_members(tar, archive))
            for m in tqdm_bar(members, desc=f"extracting {archive.name}", unit="file", enabled=progress):
                if hasattr(tarfile, "data_filter"):  # the same checks again, by the standard library
                    tar.extract(m, work, filter="data")
                else:
                    tar.extract(m, work)
        (work / marker.name).write_text(stamp)
    return sorted(p for p in dest.rglob("*") if p.is_file() and p != marker)


def _safe_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    for m in tar:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise StoryGPTError(f"{archive.name}: unsafe path {m.name!r} in the archive; not extracting it")
        if not (m.isfile() or m.isdir()):
            raise StoryGPTError(f"{archive.name}: {m.name!r} is a link or device; not extracting the archive")
        yield m


@contextmanager
def _progress_bars(on: bool):
    """huggingface_hub's download bars on or off for the duration (they are global in the library)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not on:
        disable_progress_bars()
    try:
        yield
    finally:
        if not on and not was_disabled:
            enable_progress_bars()


def describe(placed: dict[str, list[Path]], out: str | os.PathLike) -> str:
    """What was placed where, and the command that comes next."""
    lines = []
    for folder, files in placed.items():
        size = sum(f.stat().st_size for f in files)
        lines.append(f"{folder}: {len(files)} file(s), {size / 1e6:,.1f} MB in {Path(out) / folder}")
    first = next(iter(placed))
    lines.append(f"next: storygpt data prepare --input {Path(out) / ('train' if 'train' in placed else first)} "
                 "--tokenizer TOKENIZER --out DATA")
    return "\n".join(lines)
