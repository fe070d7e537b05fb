"""The base every other package stands on; it imports none of them.

- `config`  config.yaml, parsed once into frozen dataclasses (`Config`, `ConfigError`)
- `errors`  exceptions callers catch without importing torch (`CheckpointError`)
- `atomic`  files written for others: temp name in the same folder, fsync, rename
- `logs`    the log format every command sets up

The layers above, lowest first: `imaging` and `model`; `daemon` and `trainer`; `web`; `upscaled`
(the commands). docs/architecture.md draws them; `lint-imports` holds the code to them.
"""

__version__ = "0.1.0"
