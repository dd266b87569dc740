"""medpipe: declarative multi-stage training pipelines for medical LLMs."""
__version__ = "0.1.0"
