"""Packaging: the licence."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_and_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = {text = "MIT"}' in pyproject
