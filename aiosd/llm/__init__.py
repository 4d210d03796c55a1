"""LLM cores: one worker process per configured model instance."""
