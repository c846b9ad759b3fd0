"""The baseline for bench/serve: FastAPI, one request = one decode + one forward, no batching.

Same artifact, same decoding and preprocessing code, same ONNX Runtime session settings as the
real service; only the batching/pipelining differ.

    python bench/serve/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    from model_export.manifest import load_manifest
    from model_export.onnx import ort_session
    from service.decode import DecodeLimits, decode_image
    from service.encoding import encode
    from uembed.preprocess import PreprocessSpec

    manifest = load_manifest(sys.argv[1])
    spec = PreprocessSpec.from_dict(manifest.preprocess)
    session = ort_session(manifest.path("onnx"))
    name = session.get_inputs()[0].name
    limits = DecodeLimits(16 << 20, 50_000_000)
    app = FastAPI()

    @app.post("/embed")
    def embed(body: bytes = __import__("fastapi").Body(..., media_type="image/jpeg")) -> Response:
        x = decode_image(body, spec, limits)[None]
        out = session.run(None, {name: x})[0]
        import orjson

        return Response(orjson.dumps({"embeddings": encode(out, "both")}, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


if __name__ == "__main__":
    main()
