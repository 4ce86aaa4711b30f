"""Model families, one self-contained file each: config dataclass, modules, heads and checkpoint rename table."""
