"""``fusedit serve``: a web page (Gradio) to try a model — :mod:`~fusedit.serve.host` (finding models, sampling,
checking a request; no Gradio) and :mod:`~fusedit.serve.app` (the page and its API)."""
