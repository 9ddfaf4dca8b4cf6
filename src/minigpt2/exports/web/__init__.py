"""The chatbot as one web page that runs in the browser, with no server and no network.

``export_web(run, out)`` writes it (``export.py`` says what the page holds, what fp32 and fp16 cost,
and the size limit); the page's parts are the HTML and JavaScript files beside it.
"""

from minigpt2.exports.web.export import MAX_PARAMS, WebExport, export_web

__all__ = ["MAX_PARAMS", "WebExport", "export_web"]
