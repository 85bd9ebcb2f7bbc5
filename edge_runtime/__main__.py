"""``python -m edge_runtime`` runs the CLI."""

from __future__ import annotations

import sys

from edge_runtime.cli import main

sys.exit(main())
