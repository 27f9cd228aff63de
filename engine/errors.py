"""The errors that mean "bad input": the CLIs print their one-line message and exit with code 2."""
from engine.adapters import AdapterError
from engine.checkpoint import CheckpointError
from engine.config import RecipeError
from engine.data import DataError
from engine.distributed import DistributedSetupError
from engine.finetune import OutputDirError
from engine.modeling import ModelError

USER_ERRORS = (RecipeError, DataError, ModelError, OutputDirError, DistributedSetupError, AdapterError,
               CheckpointError)
