"""Checkpoints by name: `--model` is a local directory or a Hugging Face Hub id (`org/name`, with a
`revision`: a branch, tag or commit; default `main`), as vLLM, SGLang and transformers take it.

A Hub id is resolved with `huggingface_hub` and its cache and settings as users know them (`HF_HOME` /
`HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_ENDPOINT` for a mirror), to one commit, and only what
DvD reads is fetched, with huggingface_hub's progress bars: the config files, the tokenizer and chat
template where the role needs them, the safetensors index, and the weight shards of the role's half (the
index says which shard holds which tensor: a vision node never fetches the LLM's shards, a language node
never the ViT's, a gateway none). Never a `*.py` file: remote code is neither fetched nor run.

Every command that takes a model resolves it once, at start, before any child process (`resolve_model`);
a front-end that starts children on this machine hands them the resolved directory and commit, so the
children read it with no network. What went wrong is one line naming the id (`ModelNameError`, a
ValueError: the commands' exit 2): no such id, a gated repo without access, no network with nothing
cached, a repo that is not an InternVL checkpoint. Tokens are huggingface_hub's business: never read,
logged or echoed here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint import open_checkpoint, read_weight_map, tensor_half
from dvd.errors import CheckpointError

log = logging.getLogger(__name__)
ROLES = ("vision", "language", "gateway")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # the weights of a checkpoint with no index
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# What each role reads besides weights; every role reads config.json (the checkpoint's shape and format).
ROLE_FILES = {"vision": CONFIG_FILES, "language": CONFIG_FILES + TOKENIZER_FILES,
              "gateway": CONFIG_FILES + TOKENIZER_FILES}
WEIGHT_HALVES = {"vision": "vision", "language": "language"}  # the gateway reads no weights


class ModelNameError(ValueError):
    """A `--model` that cannot be resolved; the message is one line naming it and what is wrong."""

    def in_file_terms(self) -> str:
        """The message as a config file's front-end says it: its keys `model` and `revision`, not the flags
        (`dvd launch` and `dvd cluster` have neither flag)."""
        return str(self).replace("--model ", "model: ", 1).replace("--revision ", "revision: ")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the local directory DvD reads
    # What clients call the model: a Hub id as given ("org/name", as vLLM serves it; "name" is accepted too, see
    # pipeline/serving.py), or a directory's name.
    name: str
    revision: str = ""  # the commit a Hub id resolved to (also a Hub cache snapshot's); "" for another directory
    source: str = ""  # as given: the directory or "org/name"

    def describe(self) -> str:
        return f"{self.source}@{self.revision}" if self.revision else str(self.path)

    @property
    def on_hub(self) -> bool:
        """Resolved from a Hub id (a directory given as such is its own source)."""
        return self.source != str(self.path)


def is_hub_id(model: str | Path) -> bool:
    """`org/name`, and no such local directory."""
    text = str(model)
    return HUB_ID.match(text) is not None and not Path(text).expanduser().exists()


def resolve_model(model: str | Path, revision: str = "", roles: Iterable[str] = ROLES,
                  weights: bool = True) -> ResolvedModel:
    """`model` as a local directory: itself, or a Hub id fetched (`roles`' files only; no weights unless
    `weights`) into the Hub cache at `revision`. Raises ModelNameError naming what is wrong."""
    text = str(model)
    local = Path(text).expanduser()
    if local.is_dir():
        return _directory(local, revision)
    if not HUB_ID.match(text):
        raise ModelNameError(f"--model {text}: not a checkpoint directory, nor a Hugging Face Hub id (org/name)")
    roles = tuple(roles)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ModelNameError(f"role {unknown[0]!r}: one of {', '.join(ROLES)}")
    resolved = _from_hub(text, revision or "main", roles, weights)
    log.info("model %s revision %s resolved to commit %s (%s)", text, revision or "main", resolved.revision,
             resolved.path)
    return resolved


def _directory(path: Path, revision: str) -> ResolvedModel:
    """A directory; inside a Hub cache (`.../snapshots/COMMIT`) its commit is its revision."""
    commit = path.name if path.parent.name == "snapshots" and COMMIT.match(path.name) else ""
    if revision and revision != commit:
        raise ModelNameError(f"--model {path} is a directory{f' at commit {commit}' if commit else ''}: "
                             f"--revision {revision} applies to Hub ids only")
    name = "/".join(path.parent.parent.name.split("--")[1:]) if commit else path.name  # models--org--name: org/name
    return ResolvedModel(path=path, name=name, revision=commit, source=str(path))


def _from_hub(repo_id: str, revision: str, roles: tuple[str, ...], weights: bool) -> ResolvedModel:
    with _hub_errors(repo_id, revision):
        folder = _snapshot(repo_id, revision, sorted({f for role in roles for f in ROLE_FILES[role]} | {INDEX_FILE}),
                           roles)
        _check_internvl(repo_id, folder)
        halves = sorted({WEIGHT_HALVES[r] for r in roles if r in WEIGHT_HALVES}) if weights else []
        needed = weight_files(folder, halves)
        _fetch_weights(repo_id, folder, needed, roles)
    return ResolvedModel(path=folder, name=repo_id, revision=folder.name, source=repo_id)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """huggingface_hub's errors as one line naming the id (ModelNameError)."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        access = "HF_TOKEN does not give access" if _has_token() else "no HF_TOKEN is set"
        raise ModelNameError(f"--model {repo_id}: a gated repo and {access}: accept its terms on the Hub and set "
                             "HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ModelNameError(f"--model {repo_id}: no such model on the Hub (or a private one this HF_TOKEN cannot "
                             "read)") from None
    except errors.RevisionNotFoundError:
        raise ModelNameError(f"--model {repo_id}: no revision {revision!r} on the Hub") from None
    except errors.LocalEntryNotFoundError:
        raise ModelNameError(f"--model {repo_id}: revision {revision} is not in the Hub cache ({_cache()}) and the "
                             f"Hub cannot be reached{_offline()}: run `dvd download {repo_id}` where it can (into this "
                             "cache, or copy it here), or give --model a local checkpoint directory") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise ModelNameError(f"--model {repo_id}: the Hub answered HTTP {status}") from None


def _snapshot(repo_id: str, revision: str, patterns: list[str], roles: tuple[str, ...]) -> Path:
    """The snapshot folder of `revision` holding `patterns`' files, fetched where the Hub can be reached."""
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except errors.IncompleteSnapshotError as exc:  # cached, but not these files (another role's download)
        folder = Path(exc.snapshot_path)
        raise ModelNameError(_lacks(repo_id, folder, _missing(repo_id, folder, patterns), roles)) from None


def _fetch_weights(repo_id: str, folder: Path, needed: list[str], roles: tuple[str, ...]) -> None:
    """`needed` into `folder`'s snapshot: the same commit, even if the branch moved meanwhile."""
    from huggingface_hub import errors

    if needed:  # offline, with the commit cached without these shards, they are named below
        with contextlib.suppress(errors.LocalEntryNotFoundError):
            _snapshot(repo_id, folder.name, needed, roles)
    _check_present(repo_id, folder, needed, roles)


def _missing(repo_id: str, folder: Path, patterns: list[str]) -> list[str]:
    """The files of the cached tree listing (huggingface_hub's, no network) that `patterns` name and
    `folder` lacks."""
    from huggingface_hub import get_cached_repo_tree

    tree = [entry.path for entry in get_cached_repo_tree(repo_id, revision=folder.name)]
    wanted = [path for path in tree if any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)]
    return sorted(path for path in wanted if not (folder / path).is_file())


def _check_internvl(repo_id: str, folder: Path) -> None:
    try:
        open_checkpoint(folder)
    except CheckpointError as exc:
        reason = str(exc).replace(f"{folder}/", "").replace(str(folder), "")
        raise ModelNameError(f"--model {repo_id}@{folder.name}: not an InternVL checkpoint DvD serves: "
                             f"{reason}") from None


def weight_files(folder: Path, halves: Iterable[str]) -> list[str]:
    """The safetensors files holding `halves`' tensors: the shards the index names for them, or without an
    index every `*.safetensors` (one file holds both halves)."""
    halves = set(halves)
    if not halves:
        return []
    index = folder / INDEX_FILE
    if not index.is_file():
        return ["*.safetensors"]
    return sorted({file for key, file in read_weight_map(index).items() if tensor_half(key) in halves})


def _check_present(repo_id: str, folder: Path, needed: list[str], roles: tuple[str, ...]) -> None:
    """Offline, huggingface_hub may return a cached snapshot as it is: make sure this role's files are in it."""
    missing = [f for f in needed if not (list(folder.glob(f)) if "*" in f else (folder / f).is_file())]
    if missing:
        raise ModelNameError(_lacks(repo_id, folder, missing, roles))


def _lacks(repo_id: str, folder: Path, missing: list[str], roles: tuple[str, ...]) -> str:
    """One line: the cached snapshot lacks files these roles read, and how to fetch them."""
    what = f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}" if missing else "files"
    fetch = " ".join(f"--role {role}" for role in roles) if set(roles) != set(ROLES) else ""
    return (f"--model {repo_id}@{folder.name}: the Hub cache ({_cache()}) lacks {what} this process reads and the "
            f"Hub cannot be reached{_offline()}: run `dvd download {repo_id} --revision {folder.name}"
            f"{' ' + fetch if fetch else ''}` where it can")


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> str:
    from huggingface_hub import constants

    return " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""


def _has_token() -> bool:
    """Whether huggingface_hub has a token ($HF_TOKEN or a saved login); the token itself is never looked at."""
    from huggingface_hub import get_token

    return bool(get_token())


def safetensors_headers(model: ResolvedModel | Path) -> dict[str, dict[str, Any]]:
    """Each weight file's safetensors header (tensor name -> dtype, shape, offsets; `__metadata__`), by file
    name: the files the index names, or without one every `*.safetensors` (a Hub id's `model.safetensors`).
    A file on disk is read there; one a Hub id's snapshot lacks is read from the Hub with two HTTP range
    requests (its 8-byte length, then the header): no tensor's bytes are downloaded."""
    if isinstance(model, Path):
        model = ResolvedModel(path=model, name=model.name, source=str(model))
    folder = model.path
    if (folder / INDEX_FILE).is_file():
        names = sorted(set(read_weight_map(folder / INDEX_FILE).values()))
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors")) or ([SINGLE_FILE] if model.on_hub else [])
    if not names:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    headers = {}
    for name in names:
        local = folder / name
        if local.is_file() or not model.on_hub:
            headers[name] = _file_header(local)
        else:
            headers[name] = _hub_header(model, name)
    return headers


def _file_header(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    with path.open("rb") as handle:

        def read(start: int, size: int) -> bytes:
            handle.seek(start)
            return handle.read(size)

        return _parse_header(read, str(path))


def _parse_header(read: Callable[[int, int], bytes], where: str) -> dict[str, Any]:
    """A safetensors header: an 8-byte little-endian length, then that many bytes of JSON; `read(start,
    size)` gives bytes of the file."""
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise CheckpointError(f"{where}: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: a safetensors header of {length} bytes, over {MAX_HEADER_BYTES}")
    try:
        header = json.loads(read(8, length))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object")
    return header


def _hub_header(model: ResolvedModel, filename: str) -> dict[str, Any]:
    """`filename`'s header at the resolved commit, by range requests through huggingface_hub's session (its
    endpoint, token and offline mode apply)."""
    from huggingface_hub import errors, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(model.source, filename, revision=model.revision)
    auth = build_hf_headers()

    def read(start: int, size: int) -> bytes:
        response = get_session().get(url, headers={**auth, "Range": f"bytes={start}-{start + size - 1}"})
        hf_raise_for_status(response)
        data = response.content
        return data[start:start + size] if response.status_code == 200 else data  # 200: Range ignored

    with _hub_errors(model.source, model.revision):
        try:
            return _parse_header(read, f"{model.describe()}/{filename}")
        except errors.OfflineModeIsEnabled:
            raise ModelNameError(_lacks(model.source, model.path, [filename], ("vision", "language"))) from None
