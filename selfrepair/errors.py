"""Typed errors. Each message names the path or object at fault; the CLI prints it as one line."""


class SelfRepairError(Exception):
    """Base class: everything the CLI turns into one `Error:` line."""


class ConfigError(SelfRepairError, ValueError):
    """A setting is out of range or two settings contradict each other."""


class SettingConflict(ConfigError):
    """Two settings contradict each other. `flags` says the same in the CLI's words (its option names)."""

    def __init__(self, message: str, flags: str):
        super().__init__(message)
        self.flags = flags


class ModelNotFound(SelfRepairError):
    """An unknown model name, or weights that cannot be loaded offline."""


class CorpusError(SelfRepairError):
    """The corpus is missing, empty or too short."""


class StoreNotFound(SelfRepairError):
    """No store (or no model in it) at the given path."""


class StoreError(SelfRepairError):
    """The store path is unusable: a file, not writable, or out of space."""


class StoreConflict(SelfRepairError):
    """An existing model folder was ingested with a different configuration."""


class SchemaMismatch(SelfRepairError):
    """A table's columns or types disagree with store/schema.py."""


class UnknownQuery(SelfRepairError):
    """No named query by that name."""


class QueryError(SelfRepairError):
    """A query failed, is not read-only, or lacks a parameter."""


class DeviceError(SelfRepairError):
    """The device or dtype asked for cannot be used (no CUDA, out of memory)."""


class UnsupportedModel(SelfRepairError):
    """An architecture, or a configuration of one, that selfrepair cannot compute correctly."""


class SelfCheckFailed(SelfRepairError):
    """The ingest's own check found the fast engine, the bridge or the model disagreeing."""


class StoreBusy(SelfRepairError):
    """Another process holds the model folder's writer lock."""


class WorkerFailed(SelfRepairError):
    """A distributed ingest's unit kept failing on its workers (the message names the unit and the cause)."""


class PartialStore(SelfRepairError):
    """A reader asked for `strict` refuses a model folder that holds less than its plan (store/coverage.py)."""


class PartialStoreWarning(UserWarning):
    """What `Store.open` warns with (Python's `warnings`) when a model folder holds less than its plan."""
