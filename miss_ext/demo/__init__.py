"""The fine-tuning demo: ``python -m miss_ext.demo`` (or ``miss-ext demo``); ``--help`` lists
the options. See :mod:`miss_ext.demo.run`."""

from .run import MissingDependency, find_model_dir, load_dataset, main

__all__ = ["main", "find_model_dir", "load_dataset", "MissingDependency"]
