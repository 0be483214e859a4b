"""The one exception tree of eastwest.

    EastwestError                 anything eastwest raises on purpose
    ├── ConfigError               a setting, flag or file value is wrong (names key and value)
    ├── RecordError               a flow record does not fit the contract (names field and value)
    ├── CodecError                bytes that are not a valid batch or record (names the offset)
    ├── CaptureError              a capture file or interface cannot be read (names file/offset)
    ├── CapabilityError           the kernel lacks what a component needs (names the hook)
    ├── LabError                  the lab could not be built, driven or torn down
    ├── TransportError            the aggregator could not be reached or refused a batch
    └── BusyError                 another process holds what this one needs (names it and the holder)

Lower-level errors (OSError, msgspec, zstd, subprocess) are translated at the boundary where
they happen, with `raise X(...) from exc`, so callers catch one family.
"""

from __future__ import annotations


class EastwestError(Exception):
    """Base of every error eastwest raises on purpose."""


class ConfigError(EastwestError):
    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key} is not set: {reason}" if value is None else
                         f"{key}={value!r}: {reason}")


class RecordError(EastwestError, ValueError):
    """A record value does not fit. `field` is a dotted path such as `client.port`."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"{field}={value!r}: {reason}")


class CodecError(EastwestError):
    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class CaptureError(EastwestError):
    def __init__(self, source: str, message: str, offset: int | None = None) -> None:
        self.source, self.offset = source, offset
        where = f"{source}" if offset is None else f"{source} at byte {offset}"
        super().__init__(f"{where}: {message}")


class CapabilityError(EastwestError):
    pass


class LabError(EastwestError):
    pass


class TransportError(EastwestError):
    pass


class BusyError(EastwestError):
    """Another process holds a resource this one needs exclusively (a collector's spool folder)."""
