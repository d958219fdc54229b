"""Spec tests share helper modules that sit next to them (case tables, the CRD schema as the API server uses it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
