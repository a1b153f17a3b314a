"""The command-line layer: every click command, with one shared set of options
(`patchcore.cli.common`). Each command parses its options into typed configurations and
calls a job in `patchcore.apps`; nothing here imports torch before a job starts."""
