"""A local web UI and an AUTOMATIC1111-compatible HTTP API over sample.generate.

    python -m sample.webui [--host 127.0.0.1] [--port 7860] [--model PATH] [--models-dir DIR] ...

The page (static/index.html) reproduces A1111's txt2img / img2img / inpaint / PNG Info / Checkpoint Merger screens
and calls the same `/sdapi/v1` routes that existing A1111 clients use (docs/WEBUI.md lists them). Needs the `webui` extra (fastapi, uvicorn):
`pip install -e ".[webui]"`. In Python (any ASGI server can run the app):

    from sample.webui.app import create_app
    from sample.webui.registry import Registry
    from sample.webui.service import WebUIService
    app = create_app(WebUIService(Registry(models_dir="models"), outdir="outputs", load_default=default_model))

This package imports nothing on its own, so `python -m sample.webui` can say which extra is missing instead of
failing with a traceback.
"""
