"""One task per file; each registers nothing itself: the tables live in pipelines/registry.py."""
