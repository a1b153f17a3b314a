#!/usr/bin/env python
"""Evaluate saved PatchCore models (same flags as the reference script); see --help."""

from patchcore.cli.runs import evaluate_main

if __name__ == "__main__":
    evaluate_main()
