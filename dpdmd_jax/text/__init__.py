"""Prompts -> conditionings exactly as the diffusers pipelines build them: tokenizers through
transformers (`tokenizers.py`), prompt assembly per family (`sd3.py`)."""
