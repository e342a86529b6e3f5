"""Models on a Hugging Face Hub: publish a saved model folder with its card, and fetch one by its Hub id.

A Hub id names a model repository, optionally at a pinned revision: ``owner/name`` (the head of ``main``),
``owner/name@v1`` (a tag or branch) or ``owner/name@<40-hex commit>``. ``saved_model_dir`` (core/paths.py)
turns one into a local folder with :func:`download_model`, so every consumer (``cifar10 predict``,
``cifar10 serve``, ``load_model``, ``transformers.pipeline(model=saved_model_dir(...))``) loads a Hub model
exactly as it loads a folder.

Both directions use the huggingface_hub client and its settings: the endpoint from ``HF_ENDPOINT`` and the
token from ``HF_TOKEN`` (or the token file of ``hf auth login``), the cache from ``HF_HOME`` /
``HF_HUB_CACHE``. ``publish_model`` takes them as arguments too (``cifar10 publish --endpoint/--token``).

Checksums: ``snapshot_download`` itself checks only each file's size against the Hub's metadata (its cache
names a blob after the ETag the server sent, without hashing the bytes). So :func:`download_model` then
runs the client's ``HfApi.verify_repo_checksums`` on the snapshot: it lists the repository's tree at the
downloaded commit and recomputes every local file's SHA-256 (LFS files) or git blob SHA-1 (regular files)
against it; a mismatch, or a file missing from the snapshot, refuses the model. This module imports no
torch, so the serving layer can check a model before importing it.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cifar10_pipeline.core.paths import MODEL_CARD, MODEL_DIR, NoModelError

logger = logging.getLogger(__name__)

# owner/name[@revision]; huggingface_hub's validate_repo_id has the finer rules (length, "--", "..").
HUB_MODEL_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[A-Za-z0-9_./-]+))?"
)
# What `cifar10 publish` uploads from a save_pretrained folder, at the least.
REQUIRED_MODEL_FILES = ("config.json", "preprocessor_config.json")
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
CARD_NAME = "README.md"  # the card's name in a Hub repository


class HubModelError(NoModelError):
    """A Hub model that cannot be fetched or published; ``hint`` (one line) says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def parse_hub_id(spec: str | Path) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``spec`` names a Hub model, None when it is a local path.

    A spec is local when it exists, when it is the default model folder, or (without ``@revision``) when
    its first component is a local folder: ``models/cifar10`` stays a path even before a model is trained.
    """
    text = str(spec)
    match = HUB_MODEL_ID.fullmatch(text)
    if match is None or Path(text).exists() or Path(text) == MODEL_DIR:
        return None
    if match["revision"] is None and Path(match["repo"].split("/")[0]).is_dir():
        return None
    return match["repo"], match["revision"]


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default: ``main``), downloaded into the
    Hugging Face cache if it is not there yet, its files checked against the Hub's checksums.

    Raises HubModelError (one line, with a hint) for an unknown repository or revision, an unreachable Hub
    without a cached copy, or files whose checksums do not match.
    """
    from huggingface_hub import constants

    # Memoised per endpoint and cache: `cifar10 serve` checks the model before it serves, then loads it.
    return _download_model(repo_id, revision, constants.ENDPOINT, constants.HF_HUB_CACHE)


@functools.cache
def _download_model(repo_id: str, revision: str | None, endpoint: str, cache: str) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, repo_type="model", endpoint=endpoint))
    except HFValidationError as exc:
        raise HubModelError(f"{spec} is not a valid Hub model id: {_first_line(exc)}") from None
    except RevisionNotFoundError:
        raise HubModelError(
            f"the Hub model {repo_id} has no revision {revision!r} ({endpoint})",
            "give a commit, tag or branch the repository has: owner/name@<commit sha or tag>",
        ) from None
    except GatedRepoError:
        raise HubModelError(
            f"the Hub model {repo_id} is gated ({endpoint})", "accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        # Without @revision the spec may as well be a mistyped folder: say that none is here either.
        folder = "" if revision else f"no folder {repo_id} here, and "
        raise HubModelError(
            f"{folder}no model repository {repo_id} on the Hub at {endpoint}, or it is private",
            "check the id (owner/name), set HF_TOKEN for a private one, or HF_ENDPOINT for another Hub",
        ) from None
    except LocalEntryNotFoundError:
        raise HubModelError(
            f"cannot reach the Hub at {endpoint} and {spec} is not in the cache ({cache})",
            "connect to the network once (the cache then serves it offline), or give a model folder",
        ) from None
    except HfHubHTTPError as exc:
        raise HubModelError(f"the Hub at {endpoint} refused {spec}: {_first_line(exc)}") from None
    commit = folder.name
    try:
        report = HfApi(endpoint=endpoint).verify_repo_checksums(repo_id, revision=commit, cache_dir=cache)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        logger.warning("%s: offline, the cached snapshot %s is not re-verified against the Hub", spec, commit)
        return folder
    except HfHubHTTPError as exc:
        raise HubModelError(
            f"cannot verify {spec}: the Hub at {endpoint} did not list its files: {_first_line(exc)}"
        ) from None
    problems = [f"{m['path']} ({m['algorithm']} {m['actual'][:12]}, the Hub lists {m['expected'][:12]})"
                for m in report.mismatches]  # fmt: skip
    problems += [f"{path} (missing)" for path in report.missing_paths]
    if problems:
        raise HubModelError(
            f"{spec}@{commit[:12]}: downloaded files do not match the Hub's checksums: {', '.join(problems)}",
            f"delete the cached copy ({constants.HF_HUB_CACHE}) and download again",
        )
    logger.info("%s: %d files verified at commit %s", spec, report.checked_count, commit)
    return folder


# -------------------------------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class Published:
    repo_id: str
    commit: str
    url: str
    files: list[str]

    @property
    def pinned_id(self) -> str:
        """What ``cifar10 predict --model`` takes to load exactly this commit."""
        return f"{self.repo_id}@{self.commit}"


def check_card(card: Path) -> None:
    """The model card exists and carries Hub metadata with a model-index (its eval results)."""
    from huggingface_hub import ModelCard, metadata_load

    if not card.is_file():
        raise HubModelError(
            f"no model card at {card}", "write it with the model_card stage (dvc repro model_card)"
        )
    import yaml

    try:
        metadata = metadata_load(card) or {}
        if metadata.get("model-index"):
            ModelCard.load(card)  # read as the Hub's client reads it: an invalid model-index raises here
    except (ValueError, yaml.YAMLError) as exc:
        raise HubModelError(f"{card}: unreadable card metadata: {_first_line(exc)}") from None
    if not metadata.get("model-index"):
        raise HubModelError(
            f"{card} has no model-index in its metadata (the eval results the Hub shows)",
            "regenerate the card: dvc repro model_card",
        )


def check_model_folder(model_dir: Path) -> list[Path]:
    """The files of a save_pretrained folder to upload; HubModelError when one the loaders need is missing."""
    if not model_dir.is_dir():
        raise HubModelError(
            f"no model folder at {model_dir}",
            "train one (dvc exp run -S profile=quick), or fetch the team's with cifar10 pull",
        )
    names = {p.name for p in model_dir.iterdir() if p.is_file()}
    missing = [name for name in REQUIRED_MODEL_FILES if name not in names]
    if not names & set(WEIGHTS_FILES):
        missing.append("model.safetensors")
    if missing:
        raise HubModelError(
            f"{model_dir} lacks {', '.join(missing)}: not a complete save_pretrained folder",
            "re-save the model with save_pretrained (the train stage writes all of them)",
        )
    # Hidden files (.gitignore, .cache) are no part of a model; the card comes from ``card``, not the folder.
    return sorted(
        p
        for p in model_dir.rglob("*")
        if p.is_file()
        and p.name != CARD_NAME
        and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    )


def publish_model(
    repo_id: str,
    model_dir: Path = MODEL_DIR,
    card: Path = MODEL_CARD,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    message: str | None = None,
    tag: str | None = None,
) -> Published:
    """Create ``repo_id`` on the Hub if needed and commit the model folder with ``card`` as its README.md,
    in one commit (tagged ``tag`` when given). ``endpoint``/``token`` None: the client's own settings."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    files = check_model_folder(model_dir)
    check_card(card)
    operations = [CommitOperationAdd(p.relative_to(model_dir).as_posix(), str(p)) for p in files]
    operations.append(CommitOperationAdd(CARD_NAME, str(card)))
    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    try:
        api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            repo_type="model",
            commit_message=message or f"Upload {model_dir.name} with its model card",
        )
        if tag:
            api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type="model")
    except HFValidationError as exc:
        raise HubModelError(f"{repo_id} is not a valid Hub model id: {_first_line(exc)}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = (
            "set HF_TOKEN (or run `hf auth login`, or pass --token) with write access to the repository"
            if status in (401, 403)
            else None
        )
        raise HubModelError(f"the Hub at {where} refused the upload: {_first_line(exc)}", hint) from None
    return Published(
        repo_id=repo_id,
        commit=info.oid,
        url=f"{where}/{repo_id}",
        files=[op.path_in_repo for op in operations],
    )
