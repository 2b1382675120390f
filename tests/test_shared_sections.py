"""The sync check (STYLE P3): every marked shared section is byte-identical in every *_pruned.py script."""
import difflib
import glob
import os
import re

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "*_pruned.py")))
MARKER = re.compile(r"^[ \t]*# -+ (end )?shared: (.+)$", flags=re.M)
# The sections of dqn_pruned.py, in file order; every online agent has all of them.
SECTIONS = ["experiment args", "pruning args", "arg checks", "environment", "network torso", "replay buffer",
            "sparse training", "run helpers"]


def shared_sections(path: str) -> dict:
    """{name: text between the opening and closing markers}; fails on unpaired, nested or repeated markers."""
    with open(path) as f:
        text = f.read()
    markers = list(MARKER.finditer(text))
    assert len(markers) % 2 == 0, f"{path}: unpaired shared-section marker"
    sections = {}
    for opening, closing in zip(markers[::2], markers[1::2]):
        name = opening.group(2)
        assert not opening.group(1), f"{path}: 'end shared: {name}' without an opening marker"
        assert closing.group(1) and closing.group(2) == name, f"{path}: section {name!r} closed by {closing.group(0).strip()!r}"
        assert name not in sections, f"{path}: section {name!r} appears twice"
        sections[name] = text[opening.end():closing.start()]
    return sections


def test_scripts_are_found():
    assert {"dqn_pruned.py", "rainbow_pruned.py", "iqn_pruned.py", "miqn_pruned.py"} <= {os.path.basename(s) for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_markers_pair_up_in_order(script):
    names = list(shared_sections(script))
    if not script.endswith("cql_pruned.py"):  # the offline agent may replace the online-only sections
        assert names == SECTIONS


@pytest.mark.parametrize("name", SECTIONS)
def test_shared_section_is_identical_everywhere(name):
    reference_path = os.path.join(ROOT, "dqn_pruned.py")
    reference = shared_sections(reference_path)[name]
    for script in SCRIPTS:
        other = shared_sections(script).get(name)
        if other is None or other == reference:
            continue
        diff = difflib.unified_diff(reference.splitlines(), other.splitlines(), "dqn_pruned.py", os.path.basename(script), lineterm="")
        pytest.fail(f"shared section {name!r} differs:\n" + "\n".join(diff))
