"""pagedserve: a high-throughput LLM inference engine and OpenAI-compatible server."""
