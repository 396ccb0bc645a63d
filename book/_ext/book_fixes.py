"""Local Sphinx extension: three fixes to the HTML that jupyter-book 1.x renders, found by the browser tests.

1. Inline scripts printed twice. Sphinx 7 keeps an inline script that an extension adds once the builder
   exists (``app.add_js_file(None, body=...)``: sphinx-thebe's ``const THEBE_JS_URL = ...``) under filename
   ``None`` and again under ``''``, so every page declares the constant twice and throws
   ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. Each page's scripts are deduplicated.
2. pydata-sphinx-theme logs ``Got invalid theme mode: .`` on a reader's first visit when ``default_mode`` is
   unset; it is set to ``auto`` (the theme's own default).
3. The sidebar toggles do nothing (pydata-sphinx-theme issue 2451): pydata-sphinx-theme 0.17 and
   sphinx-book-theme attach their click handlers to the *first* ``.primary-toggle`` / ``.secondary-toggle`` of
   the page, a navbar button that sphinx-book-theme hides; the visible buttons of the article header get none,
   so on a phone the navigation can never be opened. A click on a later toggle is passed to the first one.
"""

_FORWARD_TOGGLES = """
document.addEventListener("DOMContentLoaded", () => {
  for (const kind of [".primary-toggle", ".secondary-toggle"]) {
    const [first, ...others] = document.querySelectorAll(kind);
    others.forEach((button) => button.addEventListener("click", (event) => {
      event.preventDefault();
      first.click();
    }));
  }
});
"""


def _default_mode(app, config):
    config.html_context.setdefault("default_mode", "auto")


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (js.filename or "", js.priority, tuple(sorted(js.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app):
    app.connect("config-inited", _default_mode)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    app.add_js_file(None, body=_FORWARD_TOGGLES)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
