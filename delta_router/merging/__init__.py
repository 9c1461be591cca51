"""Merging: mergekit / PEFT merges (``Merger``), LoraHub combinations, and the select -> merge build."""
