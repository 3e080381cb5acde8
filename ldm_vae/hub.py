"""`--push-to-hub`: an exported folder, complete on disk, uploaded to a Hugging Face Hub repo.

The export is written first (atomically) and its model card already names the repo, so a
failed upload loses nothing: the folder can be pushed later as it is, with `hf upload`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .errors import UserError

try:  # huggingface_hub >= 1 talks httpx, whose errors (offline, DNS) are not OSErrors; requests' were
    from huggingface_hub.utils import httpx

    HUB_ERRORS: tuple[type[Exception], ...] = (OSError, httpx.HTTPError)
except ImportError:
    HUB_ERRORS = (OSError,)


def check_repo_id(repo_id: str | None, private: bool = False) -> None:
    """Refuse a malformed repo id (and --private without one) before any export work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id is None:
        if private:
            raise UserError("--private applies to the repo that --push-to-hub REPO_ID creates; pass both")
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--push-to-hub {repo_id}: {e}") from None


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo `repo_id` if it does not exist and upload `folder` to it; its URL."""
    from huggingface_hub import HfApi, get_token

    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload a model exported by ldm-vae")
    except HUB_ERRORS as e:
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        token = "" if get_token() else "; no Hugging Face token found (log in with `hf auth login` or set HF_TOKEN)"
        later = f"hf upload {repo_id} {shlex.quote(str(folder))}" + (" --private" if private else "")
        raise UserError(f"could not push to the Hub repo {repo_id} ({type(e).__name__}: {reason}){token}. The "
                        f"exported folder is complete at {folder}; push it later with `{later}`") from None
    return str(url)
