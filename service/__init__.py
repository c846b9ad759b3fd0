"""The embedding service: FastAPI + uvicorn, dynamic batching, float and binary embeddings."""
