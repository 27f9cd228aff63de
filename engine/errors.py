"""Every error the engine raises on purpose. A leaf: the modules import their errors from here, and it
imports nothing, so anything (the CLIs, the harness) can name them without loading the training stack.

USER_ERRORS mean "bad input": the CLIs print their one-line message and exit with code 2.
"""


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming file and key."""


class DataError(ValueError):
    """Unusable data; the message is one line naming file, row and column."""


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded; one line."""


class OutputDirError(ValueError):
    """The output folder holds a finished run, or an unfinished one nobody asked to resume."""


class DistributedSetupError(ValueError):
    """A launch that cannot work (strategy without ranks, mesh that does not divide); one line."""


class AdapterError(ValueError):
    """A LoRA / QLoRA setup that cannot work (missing layers, missing library); one line."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, or from another run); one line."""


class MissingPackageError(FileNotFoundError):
    """A `package://` path into a package that is not installed (callers turn it into their own error)."""


class PackagePartsError(MissingPackageError):
    """A multi-part archive with a piece missing, out of order, or not a zip once joined."""


class StopTraining(RuntimeError):
    """The run stopped early on purpose (signal, non-finite loss); the message says how to go on."""


USER_ERRORS = (RecipeError, DataError, ModelError, OutputDirError, DistributedSetupError, AdapterError,
               CheckpointError)
