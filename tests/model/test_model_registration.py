"""`import loftey` registers the Auto classes, in any import order, without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, folder) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHECKPOINT": str(folder)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_loftey_leaves_torch_unloaded(tiny_checkpoint):
    out = run_python(
        """
        import sys
        import loftey
        print("torch" in sys.modules, "transformers" in sys.modules)
        """,
        tiny_checkpoint,
    )
    assert out == "False False"


@pytest.mark.slow
@pytest.mark.parametrize(
    "imports",
    [
        "import loftey\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoModelForCausalLM\nimport loftey",
        "import transformers\nimport loftey\nfrom transformers import AutoConfig, AutoModelForCausalLM",
        "import loftey\nfrom transformers import AutoConfig\nfrom transformers import AutoModelForCausalLM",
    ],
    ids=["loftey-first", "transformers-first", "bare-transformers-first", "config-then-model"],
)
def test_auto_classes_load_loftey(tiny_checkpoint, imports):
    out = run_python(
        imports
        + textwrap.dedent(
            """
            import os
            config = AutoConfig.from_pretrained(os.environ["CHECKPOINT"])
            model = AutoModelForCausalLM.from_pretrained(os.environ["CHECKPOINT"])
            print(type(config).__name__, type(model).__name__)
            """
        ),
        tiny_checkpoint,
    )
    assert out == "LofteyConfig LofteyForCausalLM"
