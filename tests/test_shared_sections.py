"""The sync check: every marked shared section is byte-identical in every *_pruned.py script."""

import difflib
import glob
import os
import re

import pytest
from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "*_pruned.py")))
# A section opens at a "# ---- shared: NAME" line and runs to the next "# ----" or "# ====" line (or the file's end).
MARKER = re.compile(r"^[ \t]*# -{8,} shared: (.+)\n", flags=re.MULTILINE)
BOUNDARY = re.compile(r"^[ \t]*# (-{8,}|={8,})", flags=re.MULTILINE)
# The sections of dqn_pruned.py, in file order; every online agent has all of them.
SECTIONS = [
    "experiment args",
    "sparse and run args",
    "arg checks",
    "online checks",
    "environment",
    "network torso",
    "batch",
    "replay buffer",
    "sparse training",
    "schedules",
    "evaluation",
    "setup",
    "start or resume",
    "act and store",
    "log and checkpoint",
    "run files",
    "checkpoints",
    "command line",
]
# The offline agent shares what does not belong to the online loop, and the C51 pieces with Rainbow.
OFFLINE_SECTIONS = [
    "sparse and run args",
    "arg checks",
    "environment",
    "network torso",
    "q network",
    "batch",
    "sparse training",
    "categorical",
    "run files",
    "checkpoints",
    "command line",
]
PAIRWISE = {"q network": "dqn_pruned.py", "categorical": "rainbow_pruned.py"}  # shared by that script and cql_pruned.py
# DQN and Rainbow have presets (--preset): their help before Args, and a command line that reads them
WITH_PRESETS = ("dqn_pruned.py", "rainbow_pruned.py")
PRESET_SECTIONS = ["presets", *SECTIONS[:-1], "command line with presets"]


def shared_sections(path: str) -> dict:
    """{name: text from the line after its marker to the next marker or banner}; fails on a repeated name."""
    with open(path) as f:
        text = f.read()
    sections = {}
    for marker in MARKER.finditer(text):
        name, boundary = marker.group(1), BOUNDARY.search(text, marker.end())
        assert name not in sections, f"{path}: section {name!r} appears twice"
        sections[name] = text[marker.end() : boundary.start() if boundary else len(text)]
    return sections


def test_scripts_are_found():
    assert {"dqn_pruned.py", "rainbow_pruned.py", "iqn_pruned.py", "miqn_pruned.py"} <= {
        os.path.basename(s) for s in SCRIPTS
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_sections_in_order(script):
    names = [name for name in shared_sections(script) if name not in PAIRWISE]
    if script.endswith("cql_pruned.py"):
        assert list(shared_sections(script)) == OFFLINE_SECTIONS
    else:
        assert names == (PRESET_SECTIONS if os.path.basename(script) in WITH_PRESETS else SECTIONS)


def all_section_names() -> list:
    return sorted({name for script in SCRIPTS for name in shared_sections(script)})


@pytest.mark.parametrize("name", all_section_names())
def test_shared_section_is_identical_everywhere(name):
    """Every script that has the section has the same bytes as the first one that has it (dqn_pruned.py if it does)."""
    holders = sorted((s for s in SCRIPTS if name in shared_sections(s)), key=lambda s: not s.endswith("dqn_pruned.py"))
    assert len(holders) >= 2, f"section {name!r} is shared by one script only"
    reference = shared_sections(holders[0])[name]
    for script in holders[1:]:
        other = shared_sections(script)[name]
        if other != reference:
            diff = difflib.unified_diff(
                reference.splitlines(),
                other.splitlines(),
                os.path.basename(holders[0]),
                os.path.basename(script),
                lineterm="",
            )
            pytest.fail(f"shared section {name!r} differs:\n" + "\n".join(diff))
