"""Command-line tools that are not training: tiny pipelines for tests and trials."""
