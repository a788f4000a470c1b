"""The bottom floor: errors, atomic writes, the registry, paths, and the study spec (Study, Cell)."""
