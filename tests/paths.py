"""Where the tests find the source tree's files, from any folder under tests/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source tree
SAMPLES = ROOT / "sample_models"
FIXTURES = ROOT / "tests" / "fixtures"
