"""CI runs what the README tells a newcomer to run, so the two cannot drift apart."""

from __future__ import annotations

from pathlib import Path


def test_ci_runs_the_readme_test_command_then_the_slow_tier():
    """README's quickstart command 2 is what CI runs, verbatim, and CI also runs the `slow` tier it skips."""
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    test_command = [line for line in block.splitlines() if "pytest" in line]
    assert len(test_command) == 1, block
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert test_command[0] in ci
    assert '-m "not slow"' in test_command[0]
    slow = [line for line in ci if line.strip().endswith("pytest -q -n auto --dist loadfile -m slow")]
    assert len(slow) == 1 and slow[0] in readme  # the slow tier's command, as the README gives it
