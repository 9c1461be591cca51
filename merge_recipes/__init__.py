"""mergekit recipe templates (YAML), shipped in the wheel as ``delta_router.merge_recipes``."""
