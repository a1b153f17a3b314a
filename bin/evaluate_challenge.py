#!/usr/bin/env python
"""Evaluate a challenge-format model class on MVTec AD-layout test sets, optionally under drift; see --help."""

from patchcore.cli.challenge import challenge_main

if __name__ == "__main__":
    challenge_main()
