"""osteo-node: opportunistic osteoporosis screening on chest radiographs."""

__version__ = "0.1.0"
