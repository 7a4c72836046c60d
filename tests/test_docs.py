"""The docs hold what the commands do: every flag each command's --help shows is in docs/, the flag reference is
what the code says, and the README stays a guide (issue 28)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from tools import flag_reference


@pytest.mark.parametrize("command", flag_reference.COMMANDS)
def test_every_flag_in_help_is_documented(command):
    """Flags read from the command's real --help text (a subprocess), looked for in every page under docs/."""
    out = subprocess.run([sys.executable, f"{command}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][A-Za-z0-9_]*)", out)) - {"--help"}
    assert len(flags) > 10, out[:500]
    docs = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    missing = sorted(f for f in flags if f"`{f}`" not in docs)
    assert not missing, f"{command}.py --help shows flags docs/ does not mention: {missing}"


def test_the_flag_reference_is_what_the_code_says():
    assert (ROOT / "docs" / "flags.md").read_text(encoding="utf-8") == flag_reference.reference(), \
        "docs/flags.md is stale: run python tools/flag_reference.py"


def test_the_readme_is_a_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\(((?:docs|bench|qlora|ascend)/[^)#]+)", readme):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
