"""invariscope: measure, explain and improve how image classifiers respond to transformations."""

__version__ = "0.1.0"
