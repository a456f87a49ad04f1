"""Seeded synthetic task packs for the quality benchmark: `python -m benchmarks.tasks.generate`."""
