"""Embedding: probes -> activations -> Delta Activations (``DeltaEmbedder``) in one ``EmbeddingSpace``."""
