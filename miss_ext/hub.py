"""MissModel.push_to_hub: the adapter, not the model, to the Hugging Face Hub.

PEFT's ``push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: create the repository,
``save_pretrained`` into a temporary directory, upload what is there. This is the same sequence
through huggingface_hub alone (a MissModel does not need transformers), with the same
arguments, so what lands on the Hub is the adapter directory PEFT would push (config, weights
and a model card that marks it as a PEFT adapter of its base model). Without a network, or with
``HF_HUB_OFFLINE=1``, huggingface_hub raises its own error, as it does for PEFT.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Union


def _model_card(base_model: Optional[str], tags: list[str]) -> str:
    # JSON strings are valid YAML scalars: names with ':' or quotes need no YAML escaping.
    lines = ["---", "library_name: peft"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
        tags = [f"base_model:adapter:{base_model}"] + tags
    lines.append("tags:")
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    lines += ["---", "", "# MiSS adapter", "",
              "A MiSS (Matrix Shard Sharing) adapter in PEFT's format, written by miss_ext. Load it with "
              "`peft.PeftModel.from_pretrained(base_model, repo_id)` or, after downloading it, "
              "`miss_ext.MissModel.from_pretrained(base_model, directory)`.", ""]
    return "\n".join(lines)


def push_adapter_to_hub(model, repo_id: str, *, commit_message: Optional[str] = None,
                        commit_description: Optional[str] = None, private: Optional[bool] = None,
                        token: Union[bool, str, None] = None, revision: Optional[str] = None,
                        create_pr: bool = False, max_shard_size: Union[int, str, None] = "50GB",
                        tags: Optional[list[str]] = None):
    """Creates ``repo_id`` if needed and uploads ``model``'s adapters in one commit; returns
    huggingface_hub's CommitInfo. ``max_shard_size`` is accepted for transformers' signature:
    an adapter is always one file, as in PEFT."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as error:
        raise ImportError("push_to_hub needs the huggingface_hub package (pip install huggingface_hub)") from error
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty str such as 'user/my-adapter', got {repo_id!r}")
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    base_model = next((c.base_model_name_or_path for c in model.peft_config.values() if c.base_model_name_or_path),
                      None) or getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        with open(os.path.join(directory, "README.md"), "w") as card:
            card.write(_model_card(base_model, ["miss", "miss_ext"] + list(tags or [])))
        if revision is not None and not revision.startswith("refs/pr"):
            try:
                api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
            except HfHubHTTPError as error:
                # as transformers: a PR into a repository we cannot write to cannot make the branch
                if not (create_pr and error.response is not None and error.response.status_code == 403):
                    raise
        return api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message or "Upload model",
                                 commit_description=commit_description, token=token, create_pr=create_pr,
                                 revision=revision)
