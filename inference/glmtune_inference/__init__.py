"""glmtune inference: load fine-tune results, chat, and serve an OpenAI-compatible API with batching.

Modules: `loading` (exports → served models), `generation` (sampling and stop rules), `batching` (per-request
KV caches decoded together), `chat` (`chat` / `stream_chat`), `scheduler` (the batching engine), `server`
(FastAPI app), `serving` (`serve(uri, name, host, port, ...)`: load and run the server), `api_schema`, `metrics`,
`access_log`, `cli` (`glmtune chat`, `glmtune serve`). Importing
this package stays light; torch loads with the modules that need it.
"""
