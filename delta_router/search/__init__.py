"""Search: the FAISS ``ModelIndex`` of embeddings and the ``TaskSelector`` that ranks it for a task."""
