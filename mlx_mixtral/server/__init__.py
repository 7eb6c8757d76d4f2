"""The OpenAI-compatible HTTP server: app.py routes and guards, protocol.py requests to generation
options and responses to OpenAI objects, schema.py the request/response bodies, worker.py the
generation thread, static/ the browser chat page. `mlx-mixtral serve` is cli/serve.py."""
