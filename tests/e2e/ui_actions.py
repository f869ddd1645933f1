"""What a user does in the Dagster UI (dagster 1.13's web app), as steps on a cdp_browser.Page: open a job's launch
dialog, pick a partition per dimension by its key, launch, open a metadata figure, measure whether it fits.
The selectors are the UI's own labels and roles; the comments say what each step clicks."""
from __future__ import annotations

import json
import time

from cdp_browser import Page

# JavaScript helpers, defined once per document
_HELPERS = r"""
window.__zlt = window.__zlt || {
  // the element whose own text is exactly `t` (a label, a button's text)
  leaf: (t, root) => [...(root || document).querySelectorAll('*')].find(
      e => e.childElementCount === 0 && e.textContent.trim() === t),
  button: (prefix) => [...document.querySelectorAll('button')].find(b => b.innerText.trim().startsWith(prefix)),
};
"""


def _js(page: Page, body: str):
    return page.js(_HELPERS + body)


def _key(page: Page, key: str, code: int) -> None:
    for kind in ("keyDown", "keyUp"):
        page.cmd("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


def click_button(page: Page, prefix: str, what: str) -> None:
    """Click the first button whose text starts with `prefix` (waits for it to exist and be enabled)."""
    page.wait(_HELPERS + f"(() => {{ const b = __zlt.button({json.dumps(prefix)}); return b && !b.disabled; }})()",
              f"an enabled button {prefix!r} ({what})")
    _js(page, f"__zlt.button({json.dumps(prefix)}).click()")


def click_leaf(page: Page, text: str, what: str) -> None:
    """Click the first element whose own text is exactly `text` (a link or label, not a button)."""
    page.wait(_HELPERS + f"!!__zlt.leaf({json.dumps(text)})", f"{text!r} ({what})")
    _js(page, f"__zlt.leaf({json.dumps(text)}).click()")


def pick_partition(page: Page, dimension: str, key: str) -> None:
    """In the open launch dialog: open the `dimension` selector, type `key` into its filter (keyboard input, as a
    user types), tick exactly that key, close the selector."""
    _js(page, f"""(() => {{
        let el = __zlt.leaf({json.dumps(dimension)}, document.querySelector('[role=dialog]'));
        while (el && !el.querySelector('.bp5-popover-target')) el = el.parentElement;
        el.querySelector('.bp5-popover-target').click(); }})()""")
    page.wait("document.activeElement && document.activeElement.placeholder === 'Filter partitions'",
              f"the {dimension} selector's filter")
    page.cmd("Input.insertText", text=key)
    # each option row shows its key (twice: label and tooltip text); tick the row that is exactly `key`
    option = (f"[...document.querySelectorAll('.dagster-popover [role=menuitem]')].find(e => "
              f"e.innerText.split(/\\n/).map(s => s.trim()).includes({json.dumps(key)}))")
    page.wait(f"!!{option}", f"the option {key!r} under {dimension}")
    page.js(f"{option}.querySelector('input[type=checkbox]').click()")
    page.wait(f"{option}.querySelector('input[type=checkbox]').checked", f"{key!r} ticked")
    _key(page, "Escape", 27)
    page.wait("!document.querySelector('.dagster-popover')", f"the {dimension} selector to close")


def open_markdown_figure(page: Page) -> None:
    """On an asset's partition view: open the metadata's markdown (the figure) in its dialog."""
    page.wait(page.text("[Show Markdown]"), "a markdown metadata entry")
    _js(page, "__zlt.leaf('[Show Markdown]').click()")
    page.wait("[...document.querySelectorAll('[role=dialog] img')].some(i => i.complete && i.naturalWidth > 0)",
              "the figure in its dialog")
    time.sleep(1)  # the dialog's open animation


def figure_fit(page: Page) -> dict:
    """Sizes (CSS px) of the figure in the open dialog: the image as drawn and as encoded, the dialog's visible box,
    and whether anything scrolls sideways (the dialog body's scrollWidth beyond its clientWidth)."""
    return page.js(r"""(() => {
        const img = [...document.querySelectorAll('[role=dialog] img')].find(i => i.naturalWidth > 0);
        const dlg = img.closest('[role=dialog]');
        const r = img.getBoundingClientRect(), d = dlg.getBoundingClientRect();
        let sideways = false;
        for (let e = img.parentElement; e && e !== dlg.parentElement; e = e.parentElement)
          if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible') sideways = true;
        return {img: [r.left, r.top, r.right, r.bottom], natural: [img.naturalWidth, img.naturalHeight],
                dialog: [d.left, d.top, d.right, d.bottom], sideways,
                viewport: [window.innerWidth, window.innerHeight]};
    })()""")
