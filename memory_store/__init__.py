"""memory_store package."""
