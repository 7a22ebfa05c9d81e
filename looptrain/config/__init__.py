"""Recipes: typed schema, YAML loading with inheritance and overrides, validation."""

from looptrain.config.loader import (
    load_recipe,
    recipe_from_dict,
    recipe_hash,
    recipe_to_dict,
    recipe_to_yaml,
    save_resolved,
)
from looptrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    Recipe,
    RecipeError,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "ModelConfig", "MonitorConfig", "ObjectiveConfig", "OptimConfig",
    "ParallelConfig", "Recipe", "RecipeError", "TrackingConfig", "TrainConfig", "load_recipe",
    "recipe_from_dict", "recipe_hash", "recipe_to_dict", "recipe_to_yaml", "save_resolved",
]
