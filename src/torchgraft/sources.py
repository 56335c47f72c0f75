"""Sources users pass besides local paths: ``hf://`` hub ids and ``http(s)://`` URLs.

:func:`resolve_source` turns such a source into a local file or folder and returns it as a
:class:`ResolvedSource` (an ``os.PathLike`` that every reader accepts) with its provenance;
mappings and plain paths are returned unchanged at the cost of one string test.

- ``hf://org/repo[@revision][/file-or-subfolder]`` (also ``hf://datasets/...``,
  ``hf://spaces/...``) is looked up in the Hugging Face cache in its own layout
  (``HF_HUB_CACHE`` / ``HF_HOME`` / ``~/.cache/huggingface/hub``: ``refs/<branch>`` holds the
  commit, ``snapshots/<commit>/`` links into ``blobs/``) with no network. Only a file the cache
  lacks is downloaded, through ``huggingface_hub`` when it is installed and ``HF_HUB_OFFLINE`` is
  not set. Without a file, the weights are picked as transformers does: ``model.safetensors``,
  else ``model.safetensors.index.json`` (the folder, sharded), else ``pytorch_model.bin``, else
  its index.
- ``https://...`` / ``http://...`` is saved in torch.hub's checkpoint cache
  (``<torch.hub.get_dir()>/checkpoints/<the URL's file name>``, as torch.hub, timm and mmengine
  name it), so a file any of them already downloaded is used without network. Downloads go to
  ``<name>.partial`` in that folder, resume with an HTTP ``Range`` request and are renamed into
  place only when complete and verified: ``sha256=`` (or a ``#sha256=<hex>`` URL fragment) and
  torch.hub's file-name hash prefix (``name-<8+ hex of the sha256>.ext``). A mismatch raises
  :class:`~torchgraft.errors.ChecksumError` and the bad file is deleted.

Example:
    >>> resolve_source("model.pth")   # plain paths and mappings come back unchanged
    'model.pth'
    >>> parse_hf("hf://org/repo@v2/sub/model.safetensors")
    HubId(repo='org/repo', repo_type='model', revision='v2', path='sub/model.safetensors')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointNotFoundError, ChecksumError, OptionError, ReadError

HF_SCHEME = "hf://"
URL_SCHEMES = ("https://", "http://")
# transformers' preference when a repo id names no file
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")
DOWNLOAD_TIMEOUT_S = float(os.environ.get("TORCHGRAFT_DOWNLOAD_TIMEOUT", "60"))
MAX_STALLS = 3  # consecutive download attempts that add no byte before giving up
CHUNK = 1 << 20

_HF_RE = re.compile(r"hf://(?:(?P<type>datasets|spaces)/)?(?P<repo>[\w.-]+(?:/[\w.-]+)?)"
                    r"(?:@(?P<rev>[^/]+))?(?:/(?P<path>.*))?")
_HEX_RE = re.compile(r"[0-9a-f]{8,64}")
_NAME_HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9.]+$")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True, eq=False)
class ResolvedSource:
    """A local file or folder a ``hf://`` id or URL resolved to, usable wherever a path is.

    ``provenance`` is a plain dict for the report: ``kind`` ('hf', 'url' or 'file'), ``source``
    (what the user passed), ``path``, ``sha256`` (a hex digest, a ``{file: digest}`` dict for a
    sharded folder, or None when not known without hashing), and for ``hf``: ``repo``,
    ``repo_type``, ``revision``, ``commit``, ``file``; for ``url``: ``url``, ``cached``.
    """

    path: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


_PROVENANCE: dict[str, dict[str, Any]] = {}


def provenance_of(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance recorded when this process resolved a source to ``path`` (the report's
    ``source``), or None for a path the user passed directly."""
    found = _PROVENANCE.get(os.path.abspath(os.fspath(path)))
    return dict(found) if found is not None else None


def resolve_source(source: Any, *, sha256: str | None = None,
                   progress: bool | None = None) -> Any:
    """A ``hf://`` id or ``http(s)://`` URL as a local :class:`ResolvedSource`; anything else
    unchanged (with ``sha256=``, a local file is verified and returned as a ResolvedSource)."""
    if isinstance(source, ResolvedSource):
        return source
    if isinstance(source, os.PathLike):
        _refuse_mangled(os.fspath(source))
        return source if sha256 is None else _resolve_file(os.fspath(source), sha256)
    if not isinstance(source, str):
        return source
    head = source[:8].lower()
    if head.startswith(HF_SCHEME):
        resolved = _resolve_hf(source, _expected(sha256), progress)
    elif head.startswith(URL_SCHEMES):
        resolved = _resolve_url(source, sha256, progress)
    else:
        _refuse_mangled(source)
        if sha256 is None:
            return source
        resolved = _resolve_file(source, sha256)
    _PROVENANCE[os.path.abspath(resolved.path)] = resolved.provenance
    return resolved


def resolve_cli_sources(args: Any, names: tuple[str, ...] = ("file", "src", "a", "b")) -> None:
    """Replace the command line's checkpoint arguments that are ``hf://`` ids or URLs by local
    path strings, in place (``provenance_of(path)`` still says where each came from)."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str) and value[:8].lower().startswith((HF_SCHEME, *URL_SCHEMES)):
            setattr(args, name, resolve_source(value).path)


def _refuse_mangled(text: str) -> None:
    """``Path("https://x/y")`` is ``https:/x/y``: say so instead of 'no such file'."""
    if text.lower().startswith(("https:/", "http:/", "hf:/")) and not os.path.exists(text):
        raise CheckpointNotFoundError(
            f"{text}: no such file; this looks like a URL or hf:// id whose '//' was collapsed "
            "(pathlib.Path does that). Pass it as a plain str, e.g. 'https://host/file.pth'")


def _expected(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower() if isinstance(sha256, str) else sha256
    if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
        raise OptionError(f"sha256={sha256!r}: expected the file's SHA-256 as hex (64 digits, "
                          "or a prefix of at least 8)")
    return value


def _resolve_file(path: str, sha256: str) -> ResolvedSource:
    expected = _expected(sha256)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such file (sha256= pins a single file)")
    digest = file_sha256(path)
    _verify(path, digest, expected, "sha256=", keep=True)
    return ResolvedSource(path, {"kind": "file", "source": path, "path": path, "sha256": digest})


# --- hashing ------------------------------------------------------------------------------------

_HASHED: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """The file's SHA-256 hex digest (remembered per path, size and mtime in this process)."""
    import hashlib

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(4 * CHUNK):
                h.update(block)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def _verify(path: str, digest: str, expected: str | None, origin: str, keep: bool) -> None:
    if expected is None or digest.startswith(expected):
        return
    if not keep:
        os.unlink(path)
    fate = ("The file was deleted; the download was corrupted or the file on the server changed. "
            if not keep else "The file was kept; delete it to download it again. ")
    raise ChecksumError(
        f"{path}: SHA-256 is {digest}, but {origin} expects {expected}. {fate}"
        "Check the URL and the pinned hash.")


# --- hf:// ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubId:
    """A parsed ``hf://`` id; ``path`` is '' when it names the repo itself."""

    repo: str
    repo_type: str
    revision: str
    path: str


def parse_hf(text: str) -> HubId:
    """Split ``hf://[datasets/|spaces/]org/repo[@revision][/path]``."""
    from urllib.parse import unquote

    m = _HF_RE.fullmatch(text)
    if m is None:
        raise OptionError(f"{text}: not a hub id; expected hf://org/repo[@revision][/file-or-folder]"
                          ", e.g. hf://timm/resnet18.a1_in1k or hf://org/repo@v1.0/model.safetensors")
    path = (m["path"] or "").strip("/")
    revision = unquote(m["rev"]) if m["rev"] else "main"
    if ".." in path.split("/") or ".." in revision.split("/") or "\\" in path:
        raise OptionError(f"{text}: the path and revision must stay inside the repository")
    return HubId(m["repo"], (m["type"] or "models")[:-1], revision, path)


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, found as huggingface_hub finds it (read at each call)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface")
        folder = os.path.join(os.path.expanduser(home), "hub")
    return os.path.expandvars(os.path.expanduser(folder))


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def _repo_dir(hid: HubId) -> str:
    return os.path.join(hf_cache_dir(), f"{hid.repo_type}s--{hid.repo.replace('/', '--')}")


def _cached_commit(repo_dir: str, revision: str) -> str | None:
    if _COMMIT_RE.fullmatch(revision) and os.path.isdir(os.path.join(repo_dir, "snapshots",
                                                                     revision)):
        return revision
    try:
        with open(os.path.join(repo_dir, "refs", revision)) as f:
            commit = f.read().strip()
    except OSError:
        return None
    return commit if _COMMIT_RE.fullmatch(commit) else None


def _pick_local(folder: str, path: str) -> str | None:
    """The file or folder ``path`` names inside a snapshot, if the cache holds it complete."""
    target = os.path.join(folder, path) if path else folder
    if os.path.isfile(target):
        if target.endswith(".index.json"):  # a shard index names its folder
            return os.path.dirname(target) if not _missing_shards(target) else None
        return target
    if not os.path.isdir(target):
        return None
    for name in HF_WEIGHTS:
        candidate = os.path.join(target, name)
        if os.path.isfile(candidate):
            if not name.endswith(".index.json"):
                return candidate
            return target if not _missing_shards(candidate) else None
    has_weights = any(n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(target, n))
                      for n in os.listdir(target))
    return target if has_weights else None


def _missing_shards(index: str) -> list[str]:
    """Shards an index names that its folder lacks (an unreadable index names none: the
    folder reader reports it)."""
    import json

    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read(64 << 20)).get("weight_map", {})
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return []
    folder = os.path.dirname(index)
    return [s for s in shards if not os.path.isfile(os.path.join(folder, s))]


def _resolve_hf(text: str, expected: str | None, progress: bool | None) -> ResolvedSource:
    hid = parse_hf(text)
    repo_dir = _repo_dir(hid)
    commit = _cached_commit(repo_dir, hid.revision)
    local = None
    if commit is not None:
        local = _pick_local(os.path.join(repo_dir, "snapshots", commit), hid.path)
    if local is None:
        _explain_offline(text, hid, repo_dir, commit)
        local = _hf_download(text, hid)
        commit = _commit_of(local) or commit
    digest = _hf_sha256(local, expected)
    snapshot = os.path.join(repo_dir, "snapshots", commit or "")
    rel = os.path.relpath(local, snapshot) if commit else hid.path
    return ResolvedSource(local, {
        "kind": "hf", "source": text, "repo": hid.repo, "repo_type": hid.repo_type,
        "revision": hid.revision, "commit": commit, "file": "" if rel == "." else rel,
        "path": local, "sha256": digest})


def _commit_of(path: str) -> str | None:
    parts = os.path.normpath(path).split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and _COMMIT_RE.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return None


def _blob_sha256(path: str) -> str | None:
    """A cached LFS file links to ``blobs/<its sha256>``: its digest for free."""
    if not os.path.islink(path):
        return None
    name = os.path.basename(os.readlink(path))
    return name if _SHA256_RE.fullmatch(name) else None


def _hf_sha256(local: str, expected: str | None) -> str | dict[str, str | None] | None:
    if os.path.isdir(local):
        if expected is not None:
            raise OptionError(f"{local}: sha256= pins one file, but this source is a folder "
                              "(a sharded repository); name the file in the hf:// id")
        return {n: _blob_sha256(os.path.join(local, n)) for n in sorted(os.listdir(local))
                if n.endswith(WEIGHT_SUFFIXES)}
    digest = _blob_sha256(local)
    if expected is not None:
        digest = digest or file_sha256(local)
        _verify(local, digest, expected, "sha256=", keep=True)
    return digest


def _explain_offline(text: str, hid: HubId, repo_dir: str, commit: str | None) -> None:
    """Raise the reason the cache cannot serve ``hid`` when downloading is not allowed."""
    if not hf_offline():
        return
    rev = f" --revision {hid.revision}" if hid.revision != "main" else ""
    fix = (f"download it once while online (`hf download {hid.repo}{rev}`, or unset "
           "HF_HUB_OFFLINE), or point HF_HUB_CACHE / HF_HOME at the cache that holds it.")
    if not os.path.isdir(repo_dir):
        raise CheckpointNotFoundError(
            f"{text}: not in the Hugging Face cache (no {repo_dir}), and HF_HUB_OFFLINE=1 "
            f"forbids downloading. To fix: {fix}")
    if commit is None:
        known = _known_revisions(repo_dir)
        raise CheckpointNotFoundError(
            f"{text}: revision {hid.revision!r} is not in the cache ({repo_dir}); it holds "
            f"{', '.join(known) or 'no revision'}. Pass one of these after '@', or {fix}")
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    what = (f"'{hid.path}'" if hid.path else
            f"complete weights (none of {', '.join(HF_WEIGHTS)}, or a shard is missing)")
    others = [c for c in _known_revisions(repo_dir)
              if _COMMIT_RE.fullmatch(c) and c != commit
              and _pick_local(os.path.join(repo_dir, "snapshots", c), hid.path)]
    elsewhere = (f" The cached revision(s) {', '.join(others)} have it: pass @<commit>."
                 if others else "")
    raise CheckpointNotFoundError(
        f"{text}: the cached snapshot {commit[:12]} ({hid.revision}) lacks {what}; it holds "
        f"{_listing(snapshot) or 'nothing'}, and HF_HUB_OFFLINE=1 forbids downloading."
        f"{elsewhere} To fix: {fix}")


def _known_revisions(repo_dir: str) -> list[str]:
    refs_dir = os.path.join(repo_dir, "refs")
    refs = [os.path.relpath(os.path.join(d, f), refs_dir)
            for d, _, files in os.walk(refs_dir) for f in files]
    snaps = os.path.join(repo_dir, "snapshots")
    commits = sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []
    return sorted(refs) + commits


def _listing(folder: str, limit: int = 12) -> str:
    names = []
    for d, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(d, f), folder) for f in files]
    names.sort()
    more = f", ... ({len(names)} files)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _hf_download(text: str, hid: HubId) -> str:
    """Fetch the file (or the preferred weights under a folder) through huggingface_hub."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointNotFoundError(
            f"{text}: not in the Hugging Face cache ({hf_cache_dir()}) and huggingface_hub is "
            "not installed to download it. `pip install huggingface_hub`, or download the "
            "files into the cache with another tool.") from None
    names = [hid.path] if os.path.splitext(hid.path)[1] else []  # a file name, else a folder
    names += [f"{hid.path}/{n}" if hid.path else n for n in HF_WEIGHTS]
    for name in names:
        local = _hf_fetch(huggingface_hub, text, hid, name)
        if local is None:
            continue
        if not name.endswith(".index.json"):
            return local
        for shard in _missing_shards(local):
            prefix = os.path.dirname(name)
            if _hf_fetch(huggingface_hub, text, hid, f"{prefix}/{shard}" if prefix else shard) \
                    is None:
                raise CheckpointNotFoundError(f"{text}: {name} names shard {shard!r}, which the "
                                              "repository does not have")
        return os.path.dirname(local)
    raise CheckpointNotFoundError(
        f"{text}: the repository has no {', '.join(names)}. Name the weights file in the id "
        f"(hf://{hid.repo}@{hid.revision}/<file>).")


def _hf_fetch(hub: Any, text: str, hid: HubId, name: str) -> str | None:
    """One ``hf_hub_download``; None when the repository has no such file."""
    import huggingface_hub.errors as errors
    try:
        return hub.hf_hub_download(hid.repo, name, repo_type=hid.repo_type,
                                   revision=hid.revision, cache_dir=hf_cache_dir())
    except errors.RepositoryNotFoundError as err:
        raise CheckpointNotFoundError(
            f"{text}: the Hub has no repository {hid.repo!r} you can access (private or gated "
            f"repositories need `hf auth login` or HF_TOKEN) ({_first_line(err)})") from None
    except errors.RevisionNotFoundError as err:
        raise CheckpointNotFoundError(
            f"{text}: the repository has no revision {hid.revision!r}; pass a branch, tag or "
            f"commit after '@' ({_first_line(err)})") from None
    except errors.LocalEntryNotFoundError as err:  # could not reach the Hub
        raise ReadError(f"{text}: not in the cache and the Hub cannot be reached "
                        f"({_first_line(err)}); retry online or set HF_HUB_CACHE") from None
    except errors.EntryNotFoundError:
        return None
    except (OSError, ValueError, errors.HfHubHTTPError) as err:
        raise ReadError(f"{text}: downloading {name} failed ({type(err).__name__}: "
                        f"{_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --- http(s):// ----------------------------------------------------------------------------------


def _resolve_url(text: str, sha256: str | None, progress: bool | None) -> ResolvedSource:
    from urllib.parse import urlsplit

    url, _, fragment = text.partition("#")
    pinned = fragment[len("sha256="):] if fragment.lower().startswith("sha256=") else None
    expected, origin = _expected(sha256), "sha256="
    if pinned is not None:
        from_url = _expected(pinned)
        if expected is not None and not (expected.startswith(from_url)
                                         or from_url.startswith(expected)):
            raise OptionError(f"{text}: the URL's #sha256= and sha256= disagree")
        expected, origin = expected or from_url, "the URL's #sha256="
    name = os.path.basename(urlsplit(url).path)
    if name in ("", ".", ".."):
        raise OptionError(f"{url}: the URL names no file (it ends in '/'); torchgraft saves "
                          "downloads under the URL's file name, as torch.hub does")
    dest = os.path.join(_hub_checkpoints(), name)
    prov = {"kind": "url", "source": text, "url": url, "path": dest, "cached": True,
            "sha256": None}
    if not os.path.isfile(dest):
        prov["sha256"] = _download(url, dest, expected, origin, progress)
        prov["cached"] = prov["sha256"] is None  # another process finished it meanwhile
    if prov["sha256"] is None and expected is not None:
        prov["sha256"] = file_sha256(dest)
        _verify(dest, prov["sha256"], expected, origin, keep=True)
    return ResolvedSource(dest, prov)


def _hub_checkpoints() -> str:
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def name_hash_prefix(name: str) -> str | None:
    """torch.hub's convention ``name-<first 8+ hex digits of the sha256>.ext``; all-digit
    suffixes (dates, versions such as ``-20230101.pth``) are not taken for hashes."""
    m = _NAME_HASH_RE.search(name)
    return m[1] if m and not m[1].isdigit() else None


def _download(url: str, dest: str, expected: str | None, origin: str,
              progress: bool | None) -> str | None:
    """Download ``url`` to ``dest`` through ``dest.partial`` (resumed if present); the sha256,
    or None when another process completed ``dest`` while this one waited for it."""
    part = dest + ".partial"
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        f = open(part, "a+b")  # closed below; the lock lives as long as it
    except OSError as err:
        raise _unwritable(part, err) from None
    with f:
        _lock(f)
        if os.path.isfile(dest):  # another process finished it while this one waited
            _forget(part)
            return None
        job = _Download(url, f, part, progress)
        try:
            digest = job.run()
            f.flush()
            os.fsync(f.fileno())
            _verify(part, digest, expected, origin, keep=False)
            _verify(part, digest, name_hash_prefix(os.path.basename(dest)),
                    "the file name's hash prefix (torch.hub convention)", keep=False)
            os.replace(part, dest)
        except BaseException:
            if not os.path.exists(part) or f.seek(0, os.SEEK_END) == 0:
                _forget(part)  # nothing to resume: leave no trace
            raise
        _forget(part)
    return digest


def _unwritable(path: str, err: OSError) -> ReadError:
    return ReadError(f"cannot write {path} ({err.strerror or err}); free some space, or point "
                     "TORCH_HOME at a writable folder (downloads go to torch.hub's cache)")


def _lock(f: Any) -> None:
    """One downloader per file: a second process waits, then finds the finished file."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


class _Download:
    """One resumable download of ``url`` appended to the open partial file ``f``.

    The response's strong ETag (else Last-Modified) is kept next to the partial file
    (``.partial.etag``) and sent as ``If-Range`` when resuming, so a file that changed on the
    server is downloaded again from the start instead of being spliced onto old bytes.
    """

    def __init__(self, url: str, f: Any, part: str, progress: bool | None) -> None:
        import hashlib

        self.url, self.f, self.part, self.progress = url, f, part, progress
        self.etag_path = part + ".etag"
        self.h = hashlib.sha256()
        f.seek(0)
        while block := f.read(4 * CHUNK):
            self.h.update(block)
        self.offset = f.tell()
        self.validator = _read_small(self.etag_path) if self.offset else None
        self.total: int | None = None
        self.bar: _DownloadBar | None = None

    def run(self) -> str:
        """Attempt until complete; give up after ``MAX_STALLS`` attempts in a row that add no
        byte. Returns the sha256 of the whole file."""
        import http.client
        import time
        import urllib.error

        stalls, last = 0, "no attempt"
        while stalls < MAX_STALLS:
            before = self.offset
            try:
                if self._attempt():
                    if self.bar:
                        self.bar.close()
                    return self.h.hexdigest()
                last = f"the connection closed after {self.offset} of {self.total} bytes"
            except urllib.error.HTTPError as err:
                err.close()
                if err.code == 416 and self.offset:  # the partial file is no prefix of this one
                    self._restart()
                elif err.code < 500:
                    raise _http_error(self.url, err) from None
                last = f"HTTP {err.code} {err.reason}"
            except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            stalls = 0 if self.offset > before else stalls + 1
            if stalls:
                time.sleep(0.25 * stalls)
        if self.bar:
            self.bar.close()
        raise ReadError(
            f"{self.url}: download failed ({last}) after {MAX_STALLS} attempts without progress. "
            + (f"{self.offset} bytes are kept in {self.part}; the next call resumes from there. "
               if self.offset else "Nothing was saved. ")
            + f"Offline? Put the file at {self.part.removesuffix('.partial')} (torch.hub's "
            "cache) and it is used without network.")

    def _attempt(self) -> bool:
        with _open(self.url, self.offset, self.validator) as resp:
            self.total, restart = _response_span(resp, self.offset)
            if restart:
                self._restart()
            if self.offset == 0:
                self._keep_validator(resp.headers)
            self.bar = self.bar or _DownloadBar.maybe_for(self.total, self.progress,
                                                          os.path.basename(self.part))
            if self.bar:
                self.bar.set(self.offset, self.total)
            while block := resp.read(CHUNK):
                self._write(block)
        return self.total is None or self.offset == self.total

    def _write(self, block: bytes) -> None:
        try:
            self.f.write(block)
        except OSError as err:  # disk full, read-only: not worth retrying
            raise _unwritable(self.part, err) from None
        self.h.update(block)
        self.offset += len(block)
        if self.bar:
            self.bar.update(len(block))

    def _restart(self) -> None:
        import hashlib

        self.f.seek(0)
        self.f.truncate()
        self.h, self.offset, self.validator = hashlib.sha256(), 0, None

    def _keep_validator(self, headers: Any) -> None:
        etag = headers.get("ETag") or ""
        value = etag if etag.startswith('"') else headers.get("Last-Modified")
        self.validator = value
        try:
            if value:
                with open(self.etag_path, "w") as out:
                    out.write(value)
            elif os.path.exists(self.etag_path):
                os.unlink(self.etag_path)
        except OSError:
            pass  # resuming then goes without If-Range

def _forget(part: str) -> None:
    """Remove what was kept to resume ``part`` (the download finished or left nothing)."""
    for path, only_if_empty in ((part + ".etag", False), (part, True)):
        try:
            if not only_if_empty or os.path.getsize(path) == 0:
                os.unlink(path)
        except OSError:
            pass


def _read_small(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(1024).strip() or None
    except OSError:
        return None


def _open(url: str, offset: int, validator: str | None) -> Any:
    import urllib.request

    from . import __version__

    headers = {"User-Agent": f"torchgraft/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                  timeout=DOWNLOAD_TIMEOUT_S)


def _response_span(resp: Any, offset: int) -> tuple[int | None, bool]:
    """(the full file size if known, whether the body starts at 0 instead of ``offset``)."""
    length = resp.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m and int(m[1]) == offset:
            return (int(m[3]) if m[3] != "*" else None), False
        raise OSError(f"the server answered the range request with Content-Range "
                      f"{resp.headers.get('Content-Range')!r}")
    return length, offset > 0


def _http_error(url: str, err: Any) -> ReadError:
    code = f"HTTP {err.code} {err.reason}"
    if err.code in (404, 410):
        return CheckpointNotFoundError(f"{url}: {code}; check the URL (the file may have moved). "
                                       "Nothing was saved.")
    if err.code in (401, 403):
        return ReadError(f"{url}: {code}; the server refuses the download (a private file or an "
                         "expired signed link): open it in a browser or get a fresh link")
    return ReadError(f"{url}: {code}; retry later or download the file by hand and pass its path")


class _DownloadBar:
    """Bytes, rate and ETA of a download on stderr (only on a terminal unless forced)."""

    MIN_BYTES = 1 << 20

    def __init__(self, label: str) -> None:
        import sys
        import time

        self.label, self.stream, self.clock = label, sys.stderr, time.perf_counter
        self.start, self.last, self.done, self.base, self.total = self.clock(), 0.0, 0, 0, None

    @classmethod
    def maybe_for(cls, total: int | None, progress: bool | None, label: str) -> _DownloadBar | None:
        from .progress import ProgressBar

        if not ProgressBar.wanted(progress):
            return None
        if progress is None and total is not None and total < cls.MIN_BYTES:
            return None
        return cls(label.removesuffix(".partial"))

    def set(self, done: int, total: int | None) -> None:
        self.done = self.base = done
        self.total = total
        self.start = self.clock()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = self.clock()
        if now - self.last > 0.1:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = (self.done - self.base) / max(now - self.start, 1e-9)
        mb = f"{self.done / 1e6:.1f}"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            left = (self.total - self.done) / rate if rate > 0 else None
            eta = f"ETA {int(left) // 60}:{int(left) % 60:02d}" if left is not None else "ETA ?"
            bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
            text = f"[{bar}] {mb}/{self.total / 1e6:.1f} MB {rate / 1e6:.1f} MB/s {eta}"
        else:
            text = f"{mb} MB {rate / 1e6:.1f} MB/s"
        self.stream.write(f"\r{self.label[:30]} {text}")
        self.stream.flush()

    def close(self) -> None:
        self._draw(self.clock())
        self.stream.write("\n")
        self.stream.flush()
