#!/usr/bin/env python
"""Export saved models as self-contained challenge weights files (<category>.pth); see --help."""

from patchcore.cli.export import export_main

if __name__ == "__main__":
    export_main()
