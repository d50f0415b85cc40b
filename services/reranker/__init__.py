"""vidsearch service."""
