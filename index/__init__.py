"""The place database: descriptor store, FAISS (or Milvus) search, metadata, versions.

Imports `model/` only.
"""
