"""vidsearch: distributed text-to-video retrieval.

The modules in this package (the repository's `shared/` folder) are what every
service builds on: config, video decoding, models, registry, vector store,
broker, messages and metrics. Services live in `vidsearch.services`.
"""

__version__ = "0.1.0"
