"""Exceptions raised by the `rdm` library.

Every message names the offending value and says how to fix it. Callers map these to exit codes
(CLI) or HTTP statuses (Serve): `ConfigError`, `InputError` and `ShapeError` are the caller's fault.
"""


class RDMError(Exception):
    """Base class for errors raised by rdm."""


class ConfigError(RDMError, ValueError):
    """A model, sampler or YAML config is invalid or unsupported."""


class InputError(RDMError, ValueError):
    """A request-level value (prompt, seed, number of neighbors, embedding) is invalid."""


class ShapeError(InputError):
    """Tensors with incompatible shapes were passed together."""


class PromptTooLongError(InputError):
    """A prompt has more tokens than the CLIP text encoder's context length."""


class ImageTooLargeError(InputError):
    """An image has more pixels than the caller allows (refused before it is decoded)."""


class SamplingStopped(RDMError):
    """Sampling was stopped between steps because the caller's `stop()` said nobody wants the result."""


class CheckpointError(RDMError):
    """A checkpoint file cannot be read."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint tried to load something other than tensors and plain containers."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint's keys or shapes do not match the model built from its config."""

    def __init__(self, message: str, *, missing: list[str] = (), unexpected: list[str] = (),
                 mismatched: list[str] = ()) -> None:
        self.message = message
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = [message]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__("; ".join(parts))

    def __reduce__(self):
        return _rebuild_incompatible, (self.message, self.missing, self.unexpected, self.mismatched)


def _rebuild_incompatible(message, missing, unexpected, mismatched) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(message, missing=missing, unexpected=unexpected, mismatched=mismatched)
