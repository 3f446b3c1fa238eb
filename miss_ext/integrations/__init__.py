"""Bridges between miss_ext and other libraries (imported on demand: ``miss_ext.integrations.peft``
needs the ``peft`` package, the rest of miss_ext does not)."""
