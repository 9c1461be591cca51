"""Routing: task profiles of finetunes and the ``Router`` that sends each query to one (or a mix)."""
