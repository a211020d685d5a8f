"""MODEL arguments that name a Hugging Face Hub repository (`Qwen/Qwen3-30B-A3B`, `owner/name@revision`).

A local path always wins. Otherwise huggingface_hub's snapshot_download resolves the id through its cache
(HF_HOME / HF_HUB_CACHE), downloading what is missing when the Hub can be reached, with its own progress
bars; offline (HF_HUB_OFFLINE=1, or no network) it returns a complete cached snapshot or fails, and we turn
its failure into one line that says what is missing and how to get it. Only the files a conversion reads
are fetched: config and tokenizer files and safetensors shards, not .bin / .pth / .gguf duplicates.
"""
from __future__ import annotations

import re
from pathlib import Path

from moeq2gguf.errors import Moeq2ggufError

# what convert / calibrate read from a checkpoint folder (io/checkpoint.py, io/vocab.py)
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.match(ref)) and not ref.startswith((".", "/", "~")) and ".." not in ref


def resolve_model(ref: str | Path) -> Path:
    """The checkpoint folder for a local path or a Hub id (downloaded or found in the cache)."""
    path = Path(ref).expanduser()
    if path.exists() or isinstance(ref, Path) or not looks_like_repo_id(str(ref)):
        return path
    repo_id, _, revision = str(ref).partition("@")
    return Path(_snapshot(repo_id, revision or None))


def model_display_name(ref: str | Path) -> str:
    """general.name: the folder's name, or the repository's for a Hub id (not the snapshot's commit hash)."""
    path = Path(ref).expanduser()
    if path.exists() or isinstance(ref, Path) or not looks_like_repo_id(str(ref)):
        return path.resolve().name
    return str(ref).partition("@")[0].split("/")[-1]


def _snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    cache = constants.HF_HUB_CACHE
    fetch = f"`hf download {repo_id}{' --revision ' + revision if revision else ''}` on a machine with network access " \
            "(and copy its cache here), or pass a local checkpoint folder"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    except IncompleteSnapshotError as exc:
        detail = str(exc).split(" is incomplete: ", 1)[-1].split(". ", 1)[0]
        raise Moeq2ggufError(f"{where}: the cached copy in {cache} is incomplete ({detail}) and the Hub cannot be "
                             f"reached; complete it with {fetch}") from None
    except GatedRepoError:
        raise Moeq2ggufError(f"{where} is a gated repository: accept its license on https://huggingface.co/{repo_id} "
                             "and log in (`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise Moeq2ggufError(f"{where}: the Hub has no revision {revision!r} of {repo_id}; check the branch, tag or "
                             "commit after @") from None
    except RepositoryNotFoundError:
        raise Moeq2ggufError(f"{where} is neither a local folder nor a repository on the Hub (or it is private: log in "
                             "with `hf auth login` or set HF_TOKEN); check the name") from None
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise Moeq2ggufError(f"{where} is not a local folder and not in the Hugging Face cache ({cache}), and {why}; "
                             f"get it with {fetch}") from None
    except HfHubHTTPError as exc:
        raise Moeq2ggufError(f"{where}: the Hub answered {str(exc).splitlines()[0]}; retry later, or pass a local "
                             "checkpoint folder") from None
