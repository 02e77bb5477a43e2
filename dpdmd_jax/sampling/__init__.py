"""Sample folders (keys, PNG + JSONL I/O, resume) and sampling a built run (`sample_with`)."""
