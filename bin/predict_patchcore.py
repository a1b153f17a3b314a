#!/usr/bin/env python
"""Score new images with a saved PatchCore model: accept/reject, heat maps, masks; see --help."""

from patchcore.cli.predict import predict_main

if __name__ == "__main__":
    predict_main()
