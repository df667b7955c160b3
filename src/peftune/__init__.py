"""peftune: build your own ChatGPT-style assistant by parameter-efficient fine-tuning of an open LLM."""

__version__ = "0.1.0"
