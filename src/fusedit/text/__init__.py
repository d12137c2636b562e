"""The text side: the frozen LLM as a key/value provider."""
