"""The README's Python quick start runs as written (it uses transformers and PEFT: skipped on an
install without them, e.g. ``pip install miss_ext`` with no extras)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    text = README.read_text()
    section = text.split("## Quick start (Python)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()
    assert (namespace["peft_model"](input_ids=namespace["ids"]).logits
            - namespace["model"](input_ids=namespace["ids"]).logits).abs().max() < 1e-4
