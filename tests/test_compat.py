"""The everyday-calls script (examples/everyday_calls.py): the same transformers code on
transformers and on pocketlm. Every call that works on both must give the same result, and the
calls that work on one library only must be exactly those docs/compatibility.md lists."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import everyday_calls  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return everyday_calls.run_all()


def test_calls_that_work_on_both_agree(rows):
    differ = [f"{r['family']}: {r['call']}" for r in rows if r["transformers"] == r["pocketlm"] == "ok"
              and not r["same"]]
    assert not differ
    assert sum(r["same"] for r in rows) >= 40


def test_the_compatibility_page_lists_what_works_on_one_side_only(rows):
    page = (ROOT / "docs" / "compatibility.md").read_text()
    documented = page.split("<!-- everyday-calls:begin -->")[1].split("<!-- everyday-calls:end -->")[0]
    assert documented.strip() == everyday_calls.table(rows).strip(), \
        "docs/compatibility.md is out of date: run examples/everyday_calls.py --write docs/compatibility.md"
