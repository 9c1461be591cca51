"""The model zoo: specs, building (train, embed, index; cached) and its report."""
