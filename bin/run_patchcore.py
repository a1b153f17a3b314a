#!/usr/bin/env python
"""Train and evaluate PatchCore (same flags as the reference run_patchcore.py); see --help."""

from patchcore.cli.runs import train_main

if __name__ == "__main__":
    train_main()
