"""Plain typed data: the Recipe, its validation, serialization and launch-script rendering.

Imports no torch: the tuner, the probe and the report all build on this package.
"""

from recipes.errors import (
    BadInput,
    CheckpointError,
    DownloadError,
    HardwareUnsupported,
    NothingFeasible,
    RecipeError,
    SchemaError,
    SpecError,
    StudyError,
    TrialFailed,
    WanctlError,
)
from recipes.recipe import Recipe, validate
from recipes.serialize import RecipeMeta, read_recipe, write_recipe

__all__ = [
    "BadInput", "CheckpointError", "DownloadError", "HardwareUnsupported", "NothingFeasible", "Recipe",
    "RecipeError", "RecipeMeta", "SchemaError", "SpecError", "StudyError", "TrialFailed", "WanctlError",
    "read_recipe", "validate", "write_recipe",
]
