"""Every error zqcompile raises for a user to act on, in one light module (no torch import), so the command
line can name them before anything heavy loads. The CLI prints each as one line and exits 2."""
from __future__ import annotations


class ConfigError(ValueError):
    """An invalid quantization configuration (raised before any graph work starts)."""


class ConfigWarning(UserWarning):
    """A configuration that is valid but probably not what was meant (e.g. an override that matches nothing)."""


class InputError(TypeError):
    """Inputs of the wrong type, dtype or shape (at compile or at call time)."""


class CaptureError(RuntimeError):
    """The model could not be captured with torch.export."""


class WeightError(ValueError):
    """A weight that cannot be quantized (NaN/Inf values)."""


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded."""


class EngineFileError(ValueError):
    """A file that is not a (readable) zqcompile engine."""


class OutputPathError(OSError):
    """A target path that cannot be written (checked before any work)."""


class ExportError(RuntimeError):
    """The graph cannot be exported (an op without translation, a shape the exporter rejects, a bad path)."""


class TensorRTUnavailable(ImportError):
    """TensorRT (the `tensorrt` Python package) is not installed."""


class TensorParallelError(RuntimeError):
    """A tensor-parallel run that cannot go on: another rank exited, or did not answer within the process group's
    timeout (not a user error: the command line exits 1)."""


# What the command line reports as a user error (one line, exit code 2).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, InputError, CaptureError, WeightError, ModelLoadError,
                                                EngineFileError, OutputPathError, ExportError, TensorRTUnavailable,
                                                OSError)
