"""Memory records: the memory system's embeddings and their similarity search."""
