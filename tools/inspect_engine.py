#!/usr/bin/env python3
"""Engine inspector: what a bundle holds and whether every file still matches its manifest.

    tools/inspect_engine.py ENGINE_DIR [--json] [--no-verify]

The same as `clinvla engine inspect`; exit status 0 = usable here, 1 = changed files or versions.
"""
import sys

from clinvla_engine.export.commands import engine_main

if __name__ == "__main__":
    sys.exit(engine_main(["inspect", *sys.argv[1:]]))
