"""The HTTP service: the app (:mod:`.app`), its upload limits (:mod:`.limits`) and page."""
